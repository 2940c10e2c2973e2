"""The method- and add-on-level switches that the official protocols need (docs/methods.md; docs/protocols.md,
"Differences found" items 4-6, "GSA inside MKD", "GSA inside CCL-DC"), each against the official definition, whose
constants are typed here (not read from our config classes):

- OnPro's base mixup (kornia 0.6.8 `RandomMixUpV2(p=mixup_p, lambda_val=(0, 0.6))`, OnPro `modules/APF.py:20-21`):
  one Bernoulli(p) for the call and one per row, multiplied into the row's lambda ~ U(0, 0.6), partner from one
  permutation of the base rows; a row mixes with probability p^2 (`method.mixup_row_gate=true`, the default);
  `false`: the call's gate only, p, as cil did before (bit for bit).
- The add-on papers' GSA: torchvision `RandomCrop(size, padding=4)` on the batch tensor (one offset per call, zero
  fill) then kornia `RandomHorizontalFlip` per sample (mkd_ocl `src/learners/base.py:61-66`; `method.crop=padded`),
  one view and no new-branch pass (`method.two_views=false`, `method.new_branch_augment=false`); the whole step
  skipped while the buffer is empty (`method.train_without_replay=false`); the 22 current-task rows and the other
  rows drawn with replacement (`np.random.choice`, `method.replay_with_replacement=true`).
- CCL-DC's TinyImageNet RandAugment (n 1, m 11); CCL-DC with task-free GSA (the peer follows the same
  pseudo-tasks); `addon.<name>.weight=0` is the base method bit for bit (no teacher or peer update, the method's own
  head, no extra heads).

Tolerances as tests/test_draws.py: counts against a bound of Z = 6 standard deviations, a continuous law by a
Kolmogorov-Smirnov gap below 2.5 / sqrt(n), uniform cells by a chi-square below dof + 6 sqrt(2 dof). Every seed is
fixed, so the file is deterministic.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume import FAST, checkpoint_step, cli, comparable, run_here

from cil.core.augment import PaddedCropAugment
from cil.core.buffer import ReplayBuffer
from cil.core.data.stream import Batch
from cil.core.methods.gsa import GSA, GSAConfig
from cil.core.methods.onpro import OnPro, OnProConfig
from cil.core.models import build_model
from cil.errors import ConfigError
from cil.run.bench.workloads import shorten_stream
from cil.run.config import default_config, validate
from cil.run.experiment import build_learner, load_run_dataset
from cil.schema import DatasetConfig, StreamConfig

Z = 6.0


def assert_rate(hits: int, n: int, p: float, what: str, extra_var: float = 0.0) -> None:
    """hits out of n trials at rate p, within Z standard deviations (extra_var: a variance to add, per trial)."""
    sd = math.sqrt((p * (1 - p) + extra_var) / n)
    assert abs(hits / n - p) <= Z * sd + 1e-12, f"{what}: rate {hits / n:.4f}, expected {p:.4f} +- {Z * sd:.4f}"


def assert_chi2(counts: np.ndarray, expected: np.ndarray, what: str) -> None:
    dof = len(counts) - 1
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < dof + Z * math.sqrt(2 * dof), f"{what}: chi-square {chi2:.1f} over {dof} degrees of freedom"


def assert_uniform(values: np.ndarray, lo: float, hi: float, what: str) -> None:
    """Inside [lo, hi] and a one-sample KS gap to U(lo, hi) below 2.5 / sqrt(n)."""
    v = np.sort(values)
    assert v.min() >= lo and v.max() <= hi, f"{what}: values outside [{lo}, {hi}]: {v.min()}, {v.max()}"
    cdf = (v - lo) / (hi - lo)
    n = len(v)
    gap = max(float((np.arange(1, n + 1) / n - cdf).max()), float((cdf - np.arange(n) / n).max()))
    assert gap < 2.5 / math.sqrt(n), f"{what}: KS gap {gap:.4f} to U({lo}, {hi}) over {n} values"


# ---------------------------------------------------------------------------------------------------------------
# OnPro: the base mixup's gates
# ---------------------------------------------------------------------------------------------------------------
ROWS = 16  # replay rows, one class each, so a row's label names it


def onpro(mixup_p: float, row_gate: bool | None = None, seed: int = 3) -> OnPro:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), ROWS, hidden=(32,))
    keys = {} if row_gate is None else {"mixup_row_gate": row_gate}
    # base rate 1: every replayed row goes through the base mixup (the class-pair part is tested elsewhere)
    cfg = OnProConfig(proj_dim=8, mixup_p=mixup_p, mixup_base_rate=1.0, **keys)
    cfg.validate()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return OnPro(model, opt, None, cfg, ROWS, torch.device("cpu"), seed=seed, input_shape=(1, 4, 4))


def base_mixups(method: OnPro, calls: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`calls` APF calls on one replay batch whose row r is the constant image r + 1 with label r: (x_mix, y_a,
    y_b, lambda), each stacked [calls, ROWS, ...]."""
    x = torch.arange(1, ROWS + 1, dtype=torch.float32).view(-1, 1, 1, 1).expand(ROWS, 1, 4, 4).contiguous()
    y = torch.arange(ROWS)
    outs = [method.apf(x, y, ROWS) for _ in range(calls)]
    x_mix, ya, yb, lam = (torch.stack(parts) for parts in zip(*outs, strict=True))
    return x_mix, ya, yb, lam


@pytest.mark.parametrize("p", [0.6, 0.2], ids=["cifar10_p0.6", "cifar100_p0.2"])
def test_onpro_row_gate_mixes_a_base_row_with_p_squared(p):
    """The default (`mixup_row_gate=true`): over 4000 calls a base row is mixed with probability p^2; a call mixes
    any row with probability p (1 - (1 - p)^n) (the call's gate, then the rows'); lambda of a mixed row ~ U(0,
    0.6); partners are one permutation of the base rows (a row can draw itself, probability 1/n); every row is
    (1 - lambda) x_a + lambda x_b of its two rows."""
    calls = 4000
    x_mix, ya, yb, lam = base_mixups(onpro(p), calls)
    mixed = lam > 0
    # a call's share of mixed rows is B * Bin(n, p) / n, B ~ Bernoulli(p): its variance beyond p^2 (1 - p^2)
    share_var = p * p * (1 - p) / ROWS + p**3 - p**4
    assert_rate(int(mixed.sum()), calls * ROWS, p * p, "mixed base rows", share_var * ROWS - p * p * (1 - p * p))
    # the call's gate then the rows': a call mixes some row with p (1 - (1 - p)^n) (a single gate of p^2 per row
    # would give 1 - (1 - p^2)^n, a single gate per call p^2)
    assert_rate(int(mixed.any(1).sum()), calls, p * (1 - (1 - p) ** ROWS), "calls that mix any row")
    assert_uniform(lam[mixed].double().numpy(), 0.0, 0.6, "lambda of the mixed rows")
    assert bool((lam[~mixed] == 0).all())
    for c in range(calls):
        assert sorted(ya[c].tolist()) == list(range(ROWS)), "the base rows are the replay batch's rows"
        assert sorted(yb[c].tolist()) == sorted(ya[c].tolist()), "partners: one permutation of the base rows"
    assert_rate(int((ya == yb).sum()), calls * ROWS, 1 / ROWS, "a row drawn as its own partner")
    expected = (1 - lam) * (ya + 1).float() + lam * (yb + 1).float()
    torch.testing.assert_close(x_mix[:, :, 0, 0, 0], expected)


@pytest.mark.parametrize("p", [0.6, 0.2], ids=["cifar10_p0.6", "cifar100_p0.2"])
def test_onpro_batch_gate_switch_mixes_with_p_and_repeats_the_old_draws(p):
    """`mixup_row_gate=false`: one decision per call, so a base row mixes with probability p and a call mixes all
    its rows or none; its draws are those cil made before the row gate (randperm of the rows, rand(n + 1): the
    call's uniform then the lambdas, randperm of the partners), so earlier runs repeat bit for bit."""
    method = onpro(p, row_gate=False)
    calls = 4000
    start = method.generator.get_state()
    x_mix, ya, yb, lam = base_mixups(method, calls)
    mixed = lam > 0
    per_call = mixed.sum(1)
    assert bool(((per_call == 0) | (per_call == ROWS)).all()), "all rows or none"
    assert_rate(int(mixed.any(1).sum()), calls, p, "calls that mix")
    assert_uniform(lam[mixed].double().numpy(), 0.0, 0.6, "lambda of the mixed rows")
    g = torch.Generator().manual_seed(0)
    g.set_state(start)
    for c in range(calls):  # the step before the row gate, written out
        sel = torch.randperm(ROWS, generator=g)[:ROWS]
        u = torch.rand(ROWS + 1, generator=g)
        old_lam = (0.0 + (0.6 - 0.0) * u[1:]) * (u[0] < p)
        perm = torch.randperm(ROWS, generator=g)
        assert torch.equal(lam[c], old_lam) and torch.equal(ya[c], sel) and torch.equal(yb[c], sel[perm])


def test_defaults_official_row_gate_and_gsas_own_code():
    """OnPro's row gate is on by default (as decided: the official behaviour); GSA's new keys default to GSA's own
    code (tests/test_reference_steps.py pins that step bit for bit)."""
    assert OnProConfig().mixup_row_gate is True and default_config("onpro").method.mixup_row_gate is True
    cfg = default_config("gsa").method
    assert (cfg.crop, cfg.train_without_replay, cfg.replay_with_replacement) == ("torchvision", True, False)
    assert (cfg.two_views, cfg.new_branch_augment, cfg.grayscale_p) == (True, True, 0.2)


# ---------------------------------------------------------------------------------------------------------------
# GSA: the crop with padding (mkd_ocl's transform_train)
# ---------------------------------------------------------------------------------------------------------------
def coordinate_images(n: int, size: int) -> torch.Tensor:
    """[n, 3, size, size]: channel 0 = column + 1, channel 1 = row + 1, channel 2 = the image's index + 1, so a
    crop's offset, its flip, which image it came from and the zero fill can be read from the output."""
    idx = torch.arange(size, dtype=torch.float32) + 1
    cols = idx.view(1, 1, size).expand(n, size, size)
    rows = idx.view(1, size, 1).expand(n, size, size)
    which = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1).expand(n, size, size)
    return torch.stack([cols, rows, which], 1).contiguous()


def read_crop(out: torch.Tensor, size: int, padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) of every output image of coordinate_images (the centre pixel is always inside)."""
    c = size // 2
    top = out[:, 1, c, c] - 1 - c + padding
    step = out[:, 0, c, c + 1] - out[:, 0, c, c]
    flip = step < 0
    left = torch.where(flip, out[:, 0, c, c] - 1 - (size - 1 - c), out[:, 0, c, c] - 1 - c) + padding
    return top.long(), left.long(), flip


def torchvision_crop_flip(x: torch.Tensor, top: int, left: int, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """torchvision's functional RandomCrop(size, padding) on the batch at (top, left), then the flips."""
    from torchvision.transforms import functional as TF

    out = TF.crop(TF.pad(x, [padding]), top, left, x.shape[-2], x.shape[-1])
    return torch.where(flip.view(-1, 1, 1, 1), TF.hflip(out), out)


@pytest.mark.parametrize("size, padding", [(32, 4), (8, 2)])
def test_padded_crop_one_offset_per_call_uniform_and_flip_per_sample(size, padding):
    """One offset (top, left) per call, shared by every image of the call, uniform over the (2 padding + 1)^2
    offsets of the zero-padded image (9 x 9 for 32 x 32 with padding 4); the flip per sample with p 0.5,
    independent within a call; the output equals torchvision's pad + crop + hflip at the read offset (zero fill)."""
    aug = PaddedCropAugment((size, size), padding=padding)
    g = torch.Generator().manual_seed(0)
    x = coordinate_images(8, size)
    span = 2 * padding + 1
    cells = np.zeros((span, span))
    flips, mixed_calls, calls = 0, 0, 3000
    for call in range(calls):
        out = aug(x, g)
        top, left, flip = read_crop(out, size, padding)
        assert bool((top == top[0]).all() and (left == left[0]).all()), "one offset for the whole call"
        assert torch.equal(out[:, 2, size // 2, size // 2], x[:, 2, 0, 0]), "every image stays in its row"
        cells[int(top[0]), int(left[0])] += 1
        flips += int(flip.sum())
        mixed_calls += bool(flip.any() and not flip.all())
        if call < 50:
            torch.testing.assert_close(out, torchvision_crop_flip(x, int(top[0]), int(left[0]), flip, padding))
    assert_chi2(cells.ravel(), np.full(span * span, calls / span**2), "crop offsets")
    assert_rate(flips, calls * 8, 0.5, "flipped images")
    assert_rate(mixed_calls, calls, 1 - 2 * 0.5**8, "calls with flipped and unflipped images")


def test_padded_crop_grayscale_and_validation():
    """grayscale_p per sample before the crop (0 in the add-on papers, GSA's 0.2 if left on); bad keys refused."""
    aug = PaddedCropAugment((8, 8), padding=4, grayscale_p=0.5)
    x = torch.rand(4000, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = aug(x, torch.Generator().manual_seed(2))
    gray = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert_rate(int(gray.sum()), 4000, 0.5, "grayscale images")
    for key, value in [("crop", "padd"), ("crop_padding", -1)]:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            GSAConfig(**{key: value}).validate()


def mkd_ocl_gsa(**more) -> GSAConfig:
    """mkd_ocl's GSA (docs/methods.md, "GSA as the add-on papers run it")."""
    keys = dict(
        two_views=False,
        crop="padded",
        grayscale_p=0.0,
        new_branch_augment=False,
        train_without_replay=False,
        replay_with_replacement=True,
    )
    cfg = GSAConfig(**{**keys, **more})
    cfg.validate()
    return cfg


SHAPE = (3, 8, 8)


def gsa(cfg: GSAConfig, model: str = "mlp", buffer: ReplayBuffer | None = None, seed: int = 0) -> GSA:
    torch.manual_seed(seed)
    net = build_model(model, SHAPE, 6, hidden=(16,)) if model == "mlp" else build_model(model, SHAPE, 6, nf=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    buf = buffer if buffer is not None else ReplayBuffer(200, SHAPE, seed=seed + 1)
    return GSA(net, opt, buf, cfg, 6, torch.device("cpu"), seed=seed + 2, input_shape=SHAPE)


def stored_batch(n: int, task: int, classes: list[int], step: int, g: torch.Generator) -> Batch:
    x = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return Batch(x, y, y.clone(), task, step, step)


def test_mkd_ocl_gsa_step_is_one_view_of_each_batch_one_offset_each():
    """In a GSA step with mkd_ocl's keys the augmentation runs exactly twice, as transform_train does: once on Xc
    (the incoming rows and the current-task rows, one view, no second pass) and once on the mixed replay batch,
    each call with one crop offset; the losses see those outputs (one view: labels not repeated)."""
    buf = ReplayBuffer(200, SHAPE, seed=1)
    g = torch.Generator().manual_seed(5)
    for t, classes in enumerate(([0, 1], [2, 3])):
        for _ in range(3):
            b = stored_batch(10, t, classes, 0, g)
            buf.add(b.x, b.y, t)
    # coordinate-encoded stored images: channel 0 column, 1 row (x 20 so the uint8 steps survive to_input)
    coords = (coordinate_images(len(buf), 8)[:, :2] * 20).to(torch.uint8)
    buf.x[: len(buf), :2] = coords
    m = gsa(mkd_ocl_gsa(crop_padding=2), buffer=buf)  # padding 2: the centre pixel of 8 x 8 is always inside
    m.on_task_start(1, torch.tensor([2, 3]))
    m.classes.mark_seen(torch.arange(4), torch.arange(4))
    calls = []
    original = m.gsa.augment.apply_grid

    def apply_grid(x, gray, grid):
        out = original(x, gray, grid)
        calls.append((x.clone(), out.clone()))
        return out

    m.gsa.augment.apply_grid = apply_grid
    b = stored_batch(10, 1, [2, 3], 7, g)
    b.x[:, :2] = (coordinate_images(10, 8)[:, :2] * 20).to(torch.uint8)
    loss, _ = m.gsa.loss(m.forward_float, b.x, b.y, 1, 7)
    assert torch.isfinite(loss)
    # r = 2 / 4: 32 other-task rows asked, min(32, 30) drawn, and the first 32 rows of Xc
    assert [len(x) for x, _ in calls] == [10 + 22, 30 + 32], "Xc once, the mixed batch once"
    for _, out in calls:
        top, left, _ = read_crop((out * 255 / 20).round(), 8, 2)
        assert bool((top == top[0]).all() and (left == left[0]).all()), "one offset per call"


# ---------------------------------------------------------------------------------------------------------------
# GSA: the first batch, with an empty buffer
# ---------------------------------------------------------------------------------------------------------------
def model_state(m: GSA) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.model.state_dict().items()}


@pytest.mark.parametrize("train_without_replay", [False, True])
def test_first_batch_skip_leaves_the_model_untouched_and_fills_the_buffer(train_without_replay):
    """`train_without_replay=false`: on the stream's first batch (empty buffer) no update, no optimizer state, no
    batch-norm statistics moved, a zero loss, the logits of the model in eval mode; the learner still stores the
    batch, and the second batch trains. `true` (the default): the first batch trains on L_new."""
    m = gsa(GSAConfig(train_without_replay=train_without_replay), model="reduced_resnet18")
    g = torch.Generator().manual_seed(0)
    m.on_task_start(0, torch.tensor([0, 1]))
    first, second = stored_batch(10, 0, [0, 1], 0, g), stored_batch(10, 0, [0, 1], 1, g)
    before = model_state(m)
    with torch.no_grad():
        m.model.eval()
        eval_logits = m.forward(first.x)
        m.model.train()
    out = m.observe(first)
    m.remember(first, out)
    assert len(m.buffer) == 10, "the first batch is stored either way"
    after = model_state(m)
    untouched = all(torch.equal(before[k], after[k]) for k in before)
    assert untouched == (not train_without_replay)
    if not train_without_replay:
        assert not m.optimizer.state and float(out.loss) == 0.0
        torch.testing.assert_close(out.logits, eval_logits)
    m.observe(second)
    assert any(not torch.equal(after[k], v) for k, v in model_state(m).items()), "the second batch trains"


@pytest.fixture(scope="module")
def digits():
    return load_run_dataset(default_config("gsa", dataset=DatasetConfig(name="digits")))


def gsa_learner(tmp_path, digits, batches=20, addon=None, stream_kind="disjoint", **method_keys):
    cfg = default_config("gsa", dataset=DatasetConfig(name="digits"))
    cfg.buffer.size, cfg.log.progress, cfg.eval.anytime_every = 100, False, 0
    cfg.method.replay_batch_size, cfg.method.current_task_replay = 16, 4
    for k, v in method_keys.items():
        setattr(cfg.method, k, v)
    if addon is not None:
        cfg.addon = addon
    if stream_kind != "disjoint":
        cfg.stream = StreamConfig(kind=stream_kind)
        cfg.eval.anytime_every_samples = 0
    validate(cfg)
    learner = build_learner(cfg, tmp_path, digits)
    shorten_stream(learner.stream, batches)
    return learner


def test_first_batch_skip_with_mkd_moves_no_teacher(tmp_path, digits):
    """GSA + MKD with the add-on papers' first batch: the step is skipped whole, so the EMA teacher does not move
    either (mkd_ocl `gsa_ema.py:157`), while the stream counter that sets the bias correction does."""
    learner = gsa_learner(tmp_path, digits, addon="mkd", train_without_replay=False)
    mkd = learner.method.addons[0]
    teacher = [p.clone() for p in mkd.teachers[0].parameters()]
    batches = iter(learner.stream.batches())
    learner.train_batch(next(batches))
    assert all(torch.equal(a, b) for a, b in zip(teacher, mkd.teachers[0].parameters(), strict=True))
    assert mkd.batches == 1 and mkd.updates == 0 and len(learner.method.buffer) == 10
    learner.train_batch(next(batches))
    assert mkd.updates == 1


# ---------------------------------------------------------------------------------------------------------------
# Buffer draws with replacement
# ---------------------------------------------------------------------------------------------------------------
def filled_buffer(n: int = 50, tasks: int = 2) -> ReplayBuffer:
    buf = ReplayBuffer(n, (1, 2, 2), seed=3)
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()  # row i holds i
    for t in range(tasks):
        rows = slice(t * n // tasks, (t + 1) * n // tasks)
        buf.add(x[rows], torch.arange(n)[rows] % 5, t)
    return buf


@pytest.mark.parametrize("filters", [{}, {"task": 1}, {"exclude_task": 0}, {"classes": [1, 3]}])
def test_draws_with_replacement_repeat_rows_at_the_birthday_rate(filters):
    """`replace=True`: min(n, matching) rows, each uniform among the matching rows on its own, from the caller's
    generator (the buffer's own is left as it was): a draw of k out of N repeats a row with probability
    1 - prod_{i<k} (1 - i / N) and holds C(k, 2) / N equal pairs on average; every row matches the filter.
    Without replacement a draw never repeats a row."""
    buf = filled_buffer()
    allowed = {i for i in range(50) if all(_matches(buf, i, k, v) for k, v in filters.items())}
    n_allowed, k = len(allowed), 10
    g = torch.Generator().manual_seed(7)
    own = buf._gen.get_state()
    repeats, pairs, counts, draws = 0, 0, np.zeros(50), 4000
    for _ in range(draws):
        x, y, t = buf.sample(k, replace=True, generator=g, **filters)
        rows = x[:, 0, 0, 0].long().tolist()
        assert len(rows) == k and set(rows) <= allowed
        repeats += len(set(rows)) < k
        pairs += sum(a == b for i, a in enumerate(rows) for b in rows[i + 1 :])
        np.add.at(counts, rows, 1)
    assert torch.equal(buf._gen.get_state(), own), "the buffer's own generator is not used"
    p_repeat = 1 - math.prod(1 - i / n_allowed for i in range(k))
    assert_rate(repeats, draws, p_repeat, "draws that repeat a row")
    mean_pairs = k * (k - 1) / 2 / n_allowed
    assert abs(pairs / draws - mean_pairs) < Z * math.sqrt(mean_pairs * 1.5 / draws), "equal pairs per draw"
    keep = sorted(allowed)
    assert_chi2(counts[keep], np.full(len(keep), draws * k / len(keep)), "rows drawn")
    for _ in range(500):
        rows = buf.sample(k, **filters)[0][:, 0, 0, 0].tolist()
        assert len(set(rows)) == len(rows) == min(k, n_allowed), "without replacement: distinct rows"


def _matches(buf: ReplayBuffer, i: int, key: str, value) -> bool:
    if key == "task":
        return int(buf.task[i]) == value
    if key == "exclude_task":
        return int(buf.task[i]) != value
    return int(buf.y[i]) in value


def test_draw_with_replacement_needs_a_generator_on_the_device():
    buf = filled_buffer()
    with pytest.raises(ValueError, match="generator on the buffer's device"):
        buf.sample(4, replace=True)
    assert len(buf.sample(80, replace=True, generator=torch.Generator())[1]) == 50, "min(n, matching) rows"
    assert len(buf.sample(4, replace=True, generator=torch.Generator(), task=5)[1]) == 0


def test_gsa_draws_with_replacement_from_its_generator():
    """`replay_with_replacement=true`: both of the step's buffer draws (the 22 current-task rows, the other-task
    rows) go with replacement, from the step's generator: with 30 current-task rows in the buffer the 22 repeat
    one almost surely (1 - prod(1 - i/30) > 0.999); the default never repeats one."""
    g = torch.Generator().manual_seed(5)

    def step_rows(cfg: GSAConfig) -> list[tuple[dict, list[int]]]:
        buf = ReplayBuffer(200, SHAPE, seed=1)
        for t, classes in enumerate(([0, 1], [2, 3])):
            for _ in range(3):
                b = stored_batch(10, t, classes, 0, g)
                buf.add(b.x, b.y, t)
        m = gsa(cfg, buffer=buf)
        m.on_task_start(1, torch.tensor([2, 3]))
        m.classes.mark_seen(torch.arange(4), torch.arange(4))
        drawn = []
        sample = buf.sample

        def record(n, **kw):
            out = sample(n, **kw)
            slots = [int(((buf.x[: len(buf)] == r).flatten(1).all(1)).nonzero()[0]) for r in out[0]]
            drawn.append((kw, slots))
            return out

        buf.sample = record
        b = stored_batch(10, 1, [2, 3], 7, g)
        before = m.generator.get_state()
        m.gsa.loss(m.forward_float, b.x, b.y, 1, 7)
        assert not torch.equal(before, m.generator.get_state())
        return drawn

    with_rep = step_rows(GSAConfig(replay_with_replacement=True))
    assert [kw.get("task") for kw, _ in with_rep] == [1, None] and with_rep[1][0]["exclude_task"] == 1
    assert all(kw["replace"] and kw["generator"] is not None for kw, _ in with_rep)
    assert len(with_rep[0][1]) == 22 and len(set(with_rep[0][1])) < 22
    without = step_rows(GSAConfig())
    assert all("replace" not in kw for kw, _ in without)
    assert all(len(set(slots)) == len(slots) for _, slots in without)


# ---------------------------------------------------------------------------------------------------------------
# CCL-DC: TinyImageNet's RandAugment; with task-free GSA
# ---------------------------------------------------------------------------------------------------------------
def test_ccl_dc_randaugment_takes_tinyimagenets_n1_m11(tmp_path, digits):
    """`addon.ccl_dc.randaug_n=1 addon.ccl_dc.randaug_m=11` (CCL-DC tiny/GSACCLDC,tiny,m2000.yaml:18-19) build
    torchvision's RandAugment(1, 11): one op of magnitude 11 per call for the whole batch."""
    from torchvision.transforms import RandAugment
    from torchvision.transforms.functional import convert_image_dtype

    learner = gsa_learner(tmp_path, digits, addon={"ccl_dc": {"randaug_n": 1, "randaug_m": 11}})
    ccl = learner.method.addons[0]
    assert (ccl.randaug.num_ops, ccl.randaug.magnitude) == (1, 11)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator()
    rng.set_state(ccl.rng.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = convert_image_dtype(RandAugment(1, 11)(convert_image_dtype(x, torch.uint8)), torch.float32)
    torch.testing.assert_close(ccl.rand_augment(x), expected)


def test_ccl_dc_with_task_free_gsa_peer_follows_the_same_pseudo_tasks(tmp_path, digits):
    """`method=gsa method.task_free=true addon=ccl_dc`: the peer learner never observes the stream, so the add-on
    hands it every batch's labels: after each batch its pseudo-task, batches since its start and current classes
    are the method's, and it trains (finite parameters that move; without its pseudo-tasks its new-data softmax
    spans no class and its parameters turn NaN)."""
    learner = gsa_learner(tmp_path, digits, batches=8, addon="ccl_dc", task_free=True)
    method = learner.method
    peer = method.addons[0].peer
    start = [p.clone() for p in peer.model.parameters()]
    events = set()
    for batch in learner.stream.batches():
        learner.train_batch(batch)
        assert peer.pseudo_step == method.pseudo_step
        assert peer.classes.task_labels == method.classes.task_labels
        assert torch.equal(peer.classes.task_mask, method.classes.task_mask)
        assert peer.gsa.pseudo.state_dict() == method.gsa.pseudo.state_dict()
        events.add(method.pseudo_step[0])
    assert len(events) >= 5, "novelty events along the stream"
    assert all(bool(torch.isfinite(p).all()) for p in peer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, peer.model.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# weight 0: the base method bit for bit
# ---------------------------------------------------------------------------------------------------------------
RESULT_KEYS = (
    "acc_matrix",
    "anytime_acc",
    "anytime_curve",
    "avg_forgetting",
    "avg_incremental_acc",
    "confusion",
    "errors",
    "final_avg_acc",
    "online_acc",
)


def short_run(out_dir: Path, *more: str) -> dict:
    from cil import api

    args = ["dataset=digits", "method=er", "method.replay_batch_size=10", "buffer.size=100", "log.progress=false"]
    return api.run([*args, "threads=1", "eval.anytime_every=40", *more], out_dir=out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
def test_weight_zero_is_the_run_without_the_addon(tmp_path, addon):
    """`addon.<name>.weight=0` with every other key at its default (MKD's main head `average`, CCL-DC's
    `ensemble`): the run's results are those of the method alone (accuracy matrix, anytime curve, online
    accuracy, confusion), with no extra heads; MKD's teacher is never updated, CCL-DC's peer never trained."""
    base = short_run(tmp_path / "base")
    off = short_run(tmp_path / "off", f"addon={addon}", f"addon.{addon}.weight=0")
    assert {k: off[k] for k in RESULT_KEYS} == {k: base[k] for k in RESULT_KEYS}
    assert "heads" not in off
    with_addon = short_run(tmp_path / "on", f"addon={addon}")
    assert with_addon["heads"] and with_addon["acc_matrix"] != base["acc_matrix"], "the add-on on changes the run"


@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
def test_weight_zero_moves_no_teacher_and_no_peer(tmp_path, digits, addon):
    learner = gsa_learner(tmp_path, digits, batches=6, addon={addon: {"weight": 0.0}})
    a = learner.method.addons[0]
    nets = a.teachers if addon == "mkd" else [a.peer.model]
    before = [[p.clone() for p in net.parameters()] for net in nets]
    for batch in learner.stream.batches():
        learner.train_batch(batch)
    for net, old in zip(nets, before, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), old, strict=True))
    assert learner.method.eval_heads() == []
    x = learner.method.to_input(next(iter(learner.stream.batches())).x)
    with torch.no_grad():
        assert torch.equal(learner.method.eval_logits(x), learner.method.predict_logits(x))


# ---------------------------------------------------------------------------------------------------------------
# A run of mkd_ocl's GSA: config, CLI, resume
# ---------------------------------------------------------------------------------------------------------------
MKD_OCL_GSA = [
    "method=gsa",
    "method.replay_batch_size=32",
    "method.current_task_replay=8",
    "method.two_views=false",
    "method.crop=padded",
    "method.crop_padding=1",  # 8 x 8 digits: the share of the image that padding 4 is of 32 x 32
    "method.grayscale_p=0",
    "method.new_branch_augment=false",
    "method.train_without_replay=false",
    "method.replay_with_replacement=true",
]


@pytest.mark.slow
def test_mkd_ocl_gsa_run_resumes_bit_for_bit_after_sigkill(tmp_path, monkeypatch):
    """The add-on papers' GSA keys through the command line, with MKD: killed mid-stream and resumed, the run ends
    where the uninterrupted one ends (the with-replacement draws and the crop come from the method's generator,
    which the checkpoint holds)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # this checkout's cil
    args = [*FAST, *MKD_OCL_GSA, "addon=mkd", "stream.n_tasks=2"]
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    proc = run_here(ref, args)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "cut" / "run"
    run.parent.mkdir()
    proc = cli(run, args, "observe:45:KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint_step(run) > 0
    proc = run_here(run, args)
    assert proc.returncode == 0, proc.stderr
    a = comparable(ref)
    assert comparable(run) == a and a["final_avg_acc"] > 25


def test_avalanche_gsa_refuses_the_first_batch_skip():
    cfg = default_config("avalanche_gsa")
    cfg.method.train_without_replay = False
    with pytest.raises(ConfigError, match="method.train_without_replay=false"):
        validate(cfg)
