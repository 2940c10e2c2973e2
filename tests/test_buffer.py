import io
import math

import numpy as np
import pytest
import torch

from cil.core.buffer import ReplayBuffer
from cil.errors import ConfigError


def tagged(start: int, n: int) -> torch.Tensor:
    """n distinct uint8 images of shape [2]: the image encodes its stream position (< 65536)."""
    pos = torch.arange(start, start + n)
    return torch.stack([pos // 256, pos % 256], dim=1).to(torch.uint8)


def position(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0].long() * 256 + x[:, 1].long()


def test_fills_in_order_until_full():
    buf = ReplayBuffer(5, (2,))
    assert len(buf) == 0 and buf.x.shape == (5, 2) and buf.y.shape == (5,) and buf.task.shape == (5,)
    buf.add(tagged(0, 3), torch.tensor([7, 8, 9]), task=0)
    buf.add(tagged(3, 2), torch.tensor([1, 2]), task=1)
    assert len(buf) == 5 and buf.n_seen == 5
    assert position(buf.x).tolist() == [0, 1, 2, 3, 4]
    assert buf.y.tolist() == [7, 8, 9, 1, 2] and buf.task.tolist() == [0, 0, 0, 1, 1]
    buf.add(tagged(5, 10), torch.zeros(10, dtype=torch.long), task=2)
    assert len(buf) == 5 and buf.n_seen == 15


def test_reservoir_inclusion_is_uniform():
    # Algorithm R leaves a uniformly random 100-subset of the 2000 stream positions in the buffer. Over R runs,
    # the number of kept items in each of B = 20 equal position bins is a sum of R independent multivariate
    # hypergeometric counts, i.e. multinomial counts (mean E = R*cap/B) with variances shrunk by the finite-
    # population factor f = (N-cap)/(N-1). So sum (O-E)^2 / (E*f) is ~ chi-square with B-1 = 19 dof; its 99.9%
    # quantile is 43.8. With the fixed seeds the test is deterministic. Sensitivity: moving a fraction q of one
    # bin's expected mass E = 2000 into another adds 2 q^2 E / f ~ 4200 q^2, so a 10% shift alone reaches the bound.
    N, cap, runs, bins, batch = 2000, 100, 400, 20, 40
    per_bin = torch.zeros(bins)
    first_and_last = torch.zeros(2)
    for run in range(runs):
        buf = ReplayBuffer(cap, (1,), seed=run)
        for s in range(0, N, batch):
            buf.add(torch.zeros(batch, 1, dtype=torch.uint8), torch.arange(s, s + batch), task=0)
        kept = buf.y  # labels are stream positions here
        assert kept.unique().numel() == cap  # a full buffer of distinct items
        per_bin += torch.bincount(kept // (N // bins), minlength=bins)
        first_and_last += torch.tensor([float((kept < cap).sum()), float((kept >= N - cap).sum())])
    mean, f = runs * cap / bins, (N - cap) / (N - 1)
    chi2 = float(((per_bin - mean) ** 2 / (mean * f)).sum())
    assert chi2 < 43.8, (chi2, per_bin.tolist())
    # The first `cap` items (written without a draw) and the last `cap` are each kept with prob cap/N as well;
    # each of these totals has standard deviation sqrt(E * (1 - 1/B) * f).
    sd = math.sqrt(mean * (1 - 1 / bins) * f)
    assert (first_and_last - mean).abs().max() < 4 * sd, first_and_last.tolist()


def sequential_algorithm_r(capacity, stream_draws):
    """Reference: Vitter's algorithm R one item at a time, fed the (j, r) draws the buffer made."""
    slots = [None] * capacity
    for j, r, item in stream_draws:
        if j < capacity:
            slots[j] = item
        elif r < capacity:
            slots[r] = item
    return slots


def test_batch_collisions_match_sequential_reference():
    cap = 7
    buf = ReplayBuffer(cap, (2,), seed=123)
    draws = []
    real_draw = buf._draw

    def recording_draw(first, b):
        r = real_draw(first, b)
        draws.append((np.arange(first, first + b), np.array(r)))
        return r

    buf._draw = recording_draw
    stream, start = [], 0
    for step, b in enumerate([3, 10, 30, 1, 25, 40, 5, 60, 2, 30]):  # batches larger than the buffer collide a lot
        buf.add(tagged(start, b), torch.arange(start, start + b) * 3, task=step)
        stream += [(start + i, step) for i in range(b)]
        start += b

    j_all = np.concatenate([j for j, _ in draws])
    r_all = np.concatenate([r for _, r in draws])
    assert j_all.tolist() == list(range(start))
    # the test only means something if some batch really drew the same slot twice
    collisions = 0
    for j, r in draws:
        hit = r[(j >= cap) & (r < cap)]
        collisions += len(hit) - len(np.unique(hit))
    assert collisions > 0
    ref = sequential_algorithm_r(cap, [(int(j), int(r), stream[int(j)]) for j, r in zip(j_all, r_all, strict=True)])
    assert position(buf.x).tolist() == [pos for pos, _ in ref]
    assert buf.y.tolist() == [pos * 3 for pos, _ in ref]
    assert buf.task.tolist() == [task for _, task in ref]
    # the CPU mirrors agree with the device tensors
    assert buf.class_counts() == {pos * 3: 1 for pos, _ in ref}
    assert buf.count(task=9) == sum(t == 9 for _, t in ref)


def test_sample_filters_return_only_matching_rows_without_replacement():
    buf = ReplayBuffer(100, (2,))
    for t in range(4):
        buf.add(tagged(20 * t, 20), torch.arange(20) % 2 + 2 * t, task=t)  # task t holds classes 2t, 2t+1
    cases = [
        (dict(task=2), lambda y, t: t == 2, 20),
        (dict(exclude_task=1), lambda y, t: t != 1, 60),
        (dict(classes=torch.tensor([0, 5, 6])), lambda y, t: (y == 0) | (y == 5) | (y == 6), 30),
        (dict(task=3, classes=[5, 6]), lambda y, t: (y == 6) & (t == 3), 10),
        (dict(exclude_task=0, classes=torch.tensor([1, 2])), lambda y, t: y == 2, 10),
    ]
    for kwargs, match, available in cases:
        x, y, t = buf.sample(15, **kwargs)
        assert len(x) == min(15, available) == len(y) == len(t)
        assert match(y, t).all(), kwargs
        assert position(x).unique().numel() == len(x)  # no slot drawn twice
        assert (position(x) // 20 == t).all()  # rows stay aligned: image, label and task come from one slot
        # asking for more than available returns every matching row exactly once
        x, y, t = buf.sample(1000, **kwargs)
        assert len(x) == available and position(x).unique().numel() == available
    assert buf.count(task=2) == 20 and buf.count(exclude_task=1) == 60 and buf.count() == 80
    assert buf.count(task=1, exclude_task=1) == 0


def test_sample_never_returns_empty_slots_and_handles_empty_requests():
    buf = ReplayBuffer(10, (3, 4, 4))
    for n in (5, 0, -1):  # empty buffer
        x, y, t = buf.sample(n)
        assert x.shape == (0, 3, 4, 4) and x.dtype == torch.uint8 and y.shape == (0,) and t.shape == (0,)
    buf.add(torch.full((3, 3, 4, 4), 9, dtype=torch.uint8), torch.tensor([4, 5, 6]), task=0)
    for _ in range(50):
        x, y, t = buf.sample(10)
        assert len(x) == 3 and (x == 9).all() and sorted(y.tolist()) == [4, 5, 6] and (t == 0).all()
    assert buf.sample(0)[0].shape == (0, 3, 4, 4)
    assert buf.sample(4, task=1)[0].shape == (0, 3, 4, 4)
    assert buf.sample(4, classes=torch.tensor([99]))[1].shape == (0,)


def test_add_and_sample_never_read_device_data_on_the_host():
    # On the meta device tensors have no data: any host read of x/y/task (.item(), boolean-mask indexing,
    # .tolist(), copying to the CPU) raises. Labels come from the CPU, as the stream provides them.
    buf = ReplayBuffer(30, (3, 8, 8), device="meta")
    for t in range(6):
        buf.add(torch.empty(10, 3, 8, 8, dtype=torch.uint8, device="meta"), torch.arange(10) + 10 * t, task=t)
        x, y, task = buf.sample(64, exclude_task=t)
        assert x.device.type == "meta" and len(x) == min(30, 10 * (t + 1)) - buf.count(task=t)
        assert len(buf.sample(4, task=t, classes=torch.arange(60))[0]) == min(4, buf.count(task=t))


def test_class_balanced_evens_out_an_imbalanced_stream():
    g = torch.Generator().manual_seed(0)
    sizes = [1500, 600, 250, 90, 40, 30, 25]  # every class has more than capacity / 7 items
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=g)]
    counts = {}
    for policy in ("class_balanced", "reservoir"):
        buf = ReplayBuffer(100, (2,), policy=policy, seed=1)
        for s in range(0, len(y), 10):
            buf.add(tagged(s, len(y[s : s + 10])), y[s : s + 10], task=0)
        counts[policy] = buf.class_counts()
        assert sum(counts[policy].values()) == 100
        assert buf.y.tolist() == buf._y_cpu[:100].tolist()  # device labels and CPU mirror agree
    balanced = counts["class_balanced"]
    assert set(balanced) == set(range(7)) and max(balanced.values()) - min(balanced.values()) <= 1
    skewed = counts["reservoir"]
    assert max(skewed.values()) - min(skewed.values(), default=0) > 20  # reservoir follows the skew


def test_class_balanced_fills_in_order_then_replaces_from_the_largest_class():
    buf = ReplayBuffer(3, (2,), policy="class_balanced")
    buf.add(tagged(0, 3), torch.tensor([0, 0, 0]), task=0)
    assert position(buf.x).tolist() == [0, 1, 2]
    buf.add(tagged(3, 2), torch.tensor([1, 1]), task=1)  # class 1 is not full: each item evicts a class-0 item
    assert buf.class_counts() == {0: 1, 1: 2} and buf.task.tolist().count(1) == 2
    # Class 0 was the largest class once, so it is "full" for good (CBRS): its items may only replace its own,
    # even though it is now the smallest class. (A rule that looked only at the current largest would evict a 1.)
    for s in range(5, 25):
        buf.add(tagged(s, 1), torch.tensor([0]), task=2)
        assert buf.class_counts() == {0: 1, 1: 2}


def run_and_record(buf, start, steps):
    out = []
    for i in range(steps):
        s = start + 10 * i
        buf.add(tagged(s, 10), (torch.arange(10) + i) % 7, task=s // 40)
        out += list(buf.sample(8))
        out += list(buf.sample(5, exclude_task=s // 40, classes=torch.tensor([1, 2, 3])))
    out += [buf.x.clone(), buf.y.clone(), buf.task.clone()]
    return out


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_state_dict_round_trip_continues_bit_identically(policy):
    buf = ReplayBuffer(25, (2,), policy=policy, seed=5)
    run_and_record(buf, 0, 12)
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)  # through serialisation, as a checkpoint would
    expected = run_and_record(buf, 120, 15)

    blob.seek(0)
    fresh = ReplayBuffer(25, (2,), policy=policy, seed=999)  # a different seed: the state must override it
    fresh.load_state_dict(torch.load(blob))
    assert fresh.n_seen == 120 and len(fresh) == 25
    got = run_and_record(fresh, 120, 15)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_load_state_dict_rejects_a_mismatched_buffer():
    state = ReplayBuffer(10, (2,)).state_dict()
    with pytest.raises(ConfigError, match="capacity"):
        ReplayBuffer(11, (2,)).load_state_dict(state)


def test_bad_policy_or_capacity_names_the_value():
    with pytest.raises(ConfigError) as err:
        ReplayBuffer(10, (2,), policy="fifo")
    assert "'fifo'" in str(err.value) and "reservoir" in str(err.value) and "class_balanced" in str(err.value)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=f"got {bad}"):
            ReplayBuffer(bad, (2,))


def test_add_rejects_wrong_shape_or_dtype():
    buf = ReplayBuffer(10, (2,))
    with pytest.raises(ValueError, match="shape"):
        buf.add(torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), task=0)
    with pytest.raises(ValueError, match="dtype"):
        buf.add(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), task=0)


def test_extras_follow_their_rows_through_add_sample_and_checkpoint():
    """DER++ keeps logits with each sample: an extra must land in the same slot as its image and come back with
    it, and survive a checkpoint."""
    buf = ReplayBuffer(5, (1,), seed=3, extras={"logits": ((2,), torch.float32)})
    for step in range(6):
        x = torch.arange(step * 3, step * 3 + 3, dtype=torch.uint8).view(3, 1)
        buf.add(x, x.view(-1).long(), task=step, logits=torch.stack([x.view(-1).float(), -x.view(-1).float()], 1))
    x, y, t, extra = buf.sample_extras(5)
    assert torch.equal(extra["logits"][:, 0], x.view(-1).float()) and torch.equal(extra["logits"][:, 1], -y.float())
    copy = ReplayBuffer(5, (1,), seed=0, extras={"logits": ((2,), torch.float32)})
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy._extras["logits"][:5], buf._extras["logits"][:5])
    assert [a.tolist() for a in copy.sample_extras(3)[3].values()] == [
        b.tolist() for b in buf.sample_extras(3)[3].values()
    ]
    with pytest.raises(ValueError, match="extras"):
        buf.add(x[:1], y[:1], task=0)
    with pytest.raises(ConfigError, match="extras"):
        ReplayBuffer(5, (1,)).load_state_dict(buf.state_dict())
