"""OnPro: the assembled step against an independent float64 reference written here from the official code's
equations (train.py, modules/OPE.py, modules/APF.py, losses/loss.py of github.com/weilllllls/OnPro), APF's
class-pair selection on hand-made prototypes, a CLI run, bit-identical resume after SIGKILL, config errors.

The reference shares nothing with `cil.core.methods.onpro` / `cil.core.objectives.onpro` but its inputs and the
method's recorded random draws: buffer draws (`buffer.sample`), augmentations (`OnPro.augment`: input -> output),
the feature-slice offsets, the base mixup's uniforms (`OnPro.base_mixup_draws`) and the class-pair rows of APF's
output (whose structure the reference checks against its own prototypes before using them). The base mixup
(kornia 0.6.8's RandomMixUpV2: the call's Bernoulli(p) times each row's Bernoulli(p) times lambda ~ U(lower,
upper), partner by one permutation; `mixup_row_gate=false`: the call's gate only), rotations, views, similarities,
both contrastive losses, prototypes, OPE, the mixup CE and the total are computed here.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_reference_steps import (
    BATCH,
    N_TASKS,
    NUM_CLASSES,
    ORDER,
    SHAPE,
    TASK_CLASSES,
    BufferSnapshot,
    SampleLog,
    _digits,
    make_batches,
    to_unit,
)
from test_resume import FAST, checkpoint_step, cli, comparable, run_here

from cil.core.buffer import ReplayBuffer
from cil.core.data.stream import ClassIncrementalStream
from cil.core.learner import Learner
from cil.core.methods.onpro import OnPro, OnProConfig
from cil.core.models import build_model
from cil.errors import ConfigError

EPS = 1e-8
RTOL, ATOL = 2e-5, 2e-6


# ---------------------------------------------------------------------------------------------------------------
# The reference (float64)
# ---------------------------------------------------------------------------------------------------------------
def rotate_ref(x):
    """16 copies, block k = rot90^(0, 2, 1, 3)[k // 4] of variant k % 4: x, left half 180, both, right half 180."""
    h = x.shape[-1] // 2
    variants = []
    for turn_left, turn_right in [(False, False), (True, False), (True, True), (False, True)]:
        v = x.clone()
        if turn_left:
            v[..., :h] = torch.rot90(x[..., :h], 2, (2, 3))
        if turn_right:
            v[..., h:] = torch.rot90(x[..., h:], 2, (2, 3))
        variants.append(v)
    return torch.cat([torch.rot90(v, k, (2, 3)) for k in (0, 2, 1, 3) for v in variants])


def ntxent_ref(sim, labels, t, self_excluded):
    """losses/loss.py Supervised_NT_xent_n (self_excluded) / Supervised_NT_xent_uni."""
    n2 = sim.shape[0]
    b = n2 // 2
    lab = labels.repeat(2)
    s = sim - sim.max(1, keepdim=True).values
    e = torch.exp(s / t)
    if self_excluded:
        e = e * (~torch.eye(n2, dtype=torch.bool))
    nll = -torch.log(e / (e.sum(1, keepdim=True) + EPS) + EPS)
    m = (lab.view(-1, 1) == lab.view(1, -1)).double()
    m = m / (m.sum(1, keepdim=True) + EPS)
    if not self_excluded:
        return (m * nll).sum() / n2
    return (nll[:b, b:].diag().sum() + nll[b:, :b].diag().sum()) / n2 + 2 * (m * nll).sum() / n2


def ope_ref(z1, z2, y, t):
    """modules/OPE.py: prototypes of present classes (class order), normalised, 2K x 2K contrast."""
    classes = sorted(set(y.tolist()))
    p1 = torch.stack([z1[y == c].mean(0) for c in classes])
    p2 = torch.stack([z2[y == c].mean(0) for c in classes])
    k = len(classes)
    u = torch.cat([F.normalize(p1, dim=1), F.normalize(p2, dim=1)])
    logits = u @ u.t() / t
    total = 0.0
    for i in range(2 * k):
        j = (i + k) % (2 * k)
        denom = sum(torch.exp(logits[i, q]) for q in range(2 * k) if q != i)
        total = total + (logits[i, j] - torch.log(denom))
    means = torch.zeros(NUM_CLASSES, z1.shape[1], dtype=z1.dtype)
    for c, a, b in zip(classes, p1, p2, strict=True):
        means[c] = (a + b) / 2
    return -total / (2 * k), means.detach(), classes


class Recorder:
    def __init__(self, method):
        self.augs, self.offsets, self.apf, self.mix = [], [], [], []
        aug, off, apf, mix = method.augment, method.feature_offsets, method.apf, method.base_mixup_draws

        def augment(x):
            out = aug(x)
            self.augs.append((x.detach().clone(), out.detach().clone()))
            return out

        def feature_offsets(n):
            out = off(n)
            self.offsets.extend(out.tolist())
            return out

        def apf_(x, y, size):
            state = (method.proto_mean.clone(), method.proto_present.clone())
            out = apf(x, y, size)
            self.apf.append(((x.clone(), y.clone(), size), state, tuple(o.detach().clone() for o in out)))
            return out

        def base_mixup_draws(n, k):
            out = mix(n, k)
            self.mix.append(((n, k), out))
            return out

        method.augment, method.feature_offsets, method.apf = augment, feature_offsets, apf_
        method.base_mixup_draws = base_mixup_draws

    def reset(self):
        self.augs.clear(), self.offsets.clear(), self.apf.clear(), self.mix.clear()

    def augmented(self, x):
        for i, (inp, out) in enumerate(self.augs):
            if inp.shape == x.shape and torch.equal(inp, x):
                self.augs.pop(i)
                return out
        raise AssertionError(
            f"the method never augmented a tensor of shape {tuple(x.shape)} that the reference augments"
        )


class Ref:
    """The reference's own state across steps: the prototypes that feed APF."""

    def __init__(self):
        self.means = torch.zeros(NUM_CLASSES, 1, dtype=torch.float64)
        self.classes: list[int] = []


def base_mixup_reference(rec, mem_x, mem_y, base, knobs):
    """kornia 0.6.8's RandomMixUpV2(p, (lower, upper)) on `base` rows of the replay batch, from the recorded
    uniforms: row i mixes when the call's U < p and (row gate) its own U < p, lambda = lower + (upper - lower) U,
    with the row that one permutation of the base rows gives it; rows not mixed keep lambda 0."""
    (n, k), d = rec.mix.pop(0)
    assert (n, k) == (len(mem_y), base)
    rows, partner = d.rows.tolist(), d.partner.tolist()
    assert len(set(rows)) == base and all(0 <= r < n for r in rows), "k distinct rows of the replay batch"
    assert sorted(partner) == list(range(base)), "partners: one permutation of the base rows"
    p = knobs["mixup_p"]
    gate = (d.call < p) & ((d.row < p) if knobs.get("mixup_row_gate", True) else True)
    assert (d.row is not None) == knobs.get("mixup_row_gate", True)
    lam = (knobs["mixup_lower"] + (knobs["mixup_upper"] - knobs["mixup_lower"]) * d.lam.double()) * gate
    xb = mem_x[d.rows].double()
    lam4 = lam.view(-1, 1, 1, 1)
    return xb * (1 - lam4) + xb[d.partner] * lam4, mem_y[d.rows], mem_y[d.rows][d.partner], lam


def check_apf(rec, ref: Ref, mem_x, mem_y, size, knobs, buf: BufferSnapshot):
    """APF's output obeys modules/APF.py given the reference's prototypes (its base rows equal the reference's
    mixup of the recorded uniforms); returns it (float64 x)."""
    (x_in, y_in, size_in), (pm, pp), (x_mix, ya, yb, lam) = rec.apf.pop(0)
    assert size_in == size and torch.equal(x_in, mem_x) and torch.equal(y_in, mem_y)
    # APF reads the prototypes of the previous step's replayed batch
    assert sorted(torch.nonzero(pp).squeeze(1).tolist()) == ref.classes
    torch.testing.assert_close(pm.double()[ref.classes], ref.means[ref.classes], rtol=1e-5, atol=1e-6)
    base = int(size * knobs["mixup_base_rate"])
    m = size - base
    assert len(ya) == size
    # base rows: the reference's own mixup from the recorded uniforms; the method's must equal it
    x_base, ya_base, yb_base, lam_base = base_mixup_reference(rec, mem_x, mem_y, base, knobs)
    assert torch.equal(ya[:base], ya_base) and torch.equal(yb[:base], yb_base)
    torch.testing.assert_close(lam[:base].double(), lam_base, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_mix[:base].double(), x_base, rtol=1e-5, atol=1e-6)
    # APF rows: pair counts = round(m softmax(1/d)) fixed to sum m, one +-1 per pair at most
    classes = ref.classes
    pairs = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1 :]]
    d = torch.stack([(ref.means[a] - ref.means[b]).norm() for a, b in pairs])
    expect = torch.round(torch.softmax(1 / d, 0) * m)
    got = torch.tensor(
        [sum(1 for r in range(base, size) if (int(ya[r]), int(yb[r])) == p) for p in pairs], dtype=torch.float64
    )
    assert got.sum() == m
    delta = got - expect
    short = m - expect.sum()
    assert bool((delta.abs() <= 1).all()) and delta.sum() == short
    assert bool((delta >= 0).all()) if short >= 0 else bool((delta <= 0).all())
    # rows of a pair are consecutive, in pair order; each mixes a buffer row of y_a with one of y_b
    seq = [(int(ya[r]), int(yb[r])) for r in range(base, size)]
    assert seq == sorted(seq, key=pairs.index)
    bflat = to_unit(buf.x).flatten(1)
    for r in range(base, size):
        rows_a = bflat[buf.y == ya[r]]
        rows_b = bflat[buf.y == yb[r]]
        mix = (1 - lam[r]) * rows_a[:, None] + lam[r] * rows_b[None]
        assert bool(((mix - x_mix[r].flatten()).abs().amax(-1) < 1e-6).any()), f"APF row {r} is not a buffer mix"
    for p in set(seq):  # one mixup decision per pair
        lams = torch.stack([lam[base + i] for i, s in enumerate(seq) if s == p])
        assert bool((lams == 0).all()) or bool((lams > 0).all())
    return x_mix.double(), ya, yb, lam.double()  # checked above: the augmentations are looked up by exact input


def onpro_reference(model64, proj64, batch, seen, samples, rec, buf, ref: Ref, knobs):
    p_dim = knobs["proj_dim"]
    t_ins, t_proto = knobs["ins_temperature"], knobs["proto_temperature"]
    x, y, n = to_unit(batch.x), batch.y, len(batch.y)

    def embed(v):
        f = model64.features(v.double())
        return F.normalize(f, dim=1), F.normalize(proj64(f), dim=1)

    def sim(z, f, d, scale):
        return scale * z @ f[:, d : d + p_dim].t() + scale * z @ z.t()

    def rot_labels(lab):
        return torch.cat([lab + NUM_CLASSES * k for k in range(16)])

    def seen_pass(mx, my):
        _, z = embed(torch.cat([mx, rec.augmented(mx)]))
        loss, means, classes = ope_ref(z[: len(my)], z[len(my) :], my, t_proto)
        ref.means, ref.classes = means, classes
        return loss

    draws = iter(samples)
    if batch.task == 0:
        rx = rotate_ref(x)
        f, z = embed(torch.cat([rx, rec.augmented(rx)]))
        d = rec.offsets.pop(0)
        assert 0 <= d < model64.feature_dim - p_dim
        ins = ntxent_ref(sim(z, f, d, 1.0), rot_labels(y), t_ins, True)
        ope_seen = 0.0
        if batch.step_in_task != 0:
            n_draw, _, (mx, my, _) = next(draws)
            assert n_draw == knobs["replay_batch_size"] and len(my) == min(n_draw, len(buf.y))
            ope_seen = seen_pass(to_unit(mx), my)
        ope_new = ope_ref(z[:n], z[16 * n : 17 * n], y, t_proto)[0]
        ce = F.cross_entropy(model64(rec.augmented(x).double()), y)
    else:
        size = min(knobs["replay_batch_size"], knobs["per_class_replay"] * len(seen))
        n_draw, filters, (mx, my, _) = next(draws)
        assert n_draw == size and filters == {} and len(my) == min(size, len(buf.y))
        mx = to_unit(mx)
        if batch.step_in_task != 0:
            x_mix, ya, yb, lam = check_apf(rec, ref, mx, my, size, knobs, buf)
        else:
            x_mix, ya, yb, lam = mx.double(), my, my, torch.zeros(len(my), dtype=torch.float64)
        soft = (1 - lam.float()) * ya.float() + lam.float() * yb.float()  # official: float32 labels
        rx, rr = rotate_ref(x), rotate_ref(x_mix.float())
        ax, ar = rec.augmented(rx), rec.augmented(rr)
        f, z = embed(torch.cat([rx, ax, rr, ar]))
        k = 32 * n
        d1, d2 = rec.offsets.pop(0), rec.offsets.pop(0)
        lam_s = knobs["sim_lambda"]
        ins = ntxent_ref(sim(z[k:], f[k:], d2, lam_s), rot_labels(soft), t_ins, False) + ntxent_ref(
            sim(z[:k], f[:k], d1, lam_s), rot_labels(y), t_ins, True
        )
        logp = F.log_softmax(model64(rec.augmented(x_mix.float()).double()), 1)
        nll_a = -logp[torch.arange(len(ya)), ya]
        nll_b = -logp[torch.arange(len(yb)), yb]
        ce = ((1 - lam) * nll_a + lam * nll_b).mean()
        ope_seen = seen_pass(mx, my)
        ope_new = ope_ref(z[:n], z[16 * n : 17 * n], y, t_proto)[0]
    assert next(draws, None) is None, "the method drew buffer rows the reference does not use"
    assert not (rec.augs or rec.offsets or rec.apf or rec.mix), "the method made draws the reference does not use"
    loss = ce + ins + ope_new + ope_seen
    params = list(model64.parameters()) + list(proj64.parameters())
    return loss.detach(), torch.autograd.grad(loss, params)


SPEC = dict(
    replay_batch_size=64,
    per_class_replay=7,
    proj_dim=16,
    ins_temperature=0.07,
    proto_temperature=0.5,
    sim_lambda=1.0,
    mixup_base_rate=0.9,
    mixup_p=0.2,
    mixup_lower=0.0,
    mixup_upper=0.6,
    mixup_row_gate=True,
)
OTHER = dict(
    replay_batch_size=24,
    per_class_replay=5,
    proj_dim=12,
    ins_temperature=0.2,
    proto_temperature=0.3,
    sim_lambda=0.5,
    mixup_base_rate=0.5,
    mixup_p=1.0,
    mixup_lower=0.1,
    mixup_upper=0.4,
    mixup_row_gate=True,
)
# OTHER with the CIFAR-10 gate probability, where the row gate shows (p = 1 mixes every row either way)
ROW_GATE = {**OTHER, "mixup_p": 0.6}
BATCH_GATE = {**ROW_GATE, "mixup_row_gate": False}  # the switch: the call's gate only


def build(knobs):
    torch.manual_seed(0)
    model = build_model("mlp", SHAPE, NUM_CLASSES, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    buf = ReplayBuffer(250, SHAPE, seed=1)
    cfg = OnProConfig(**{k: v for k, v in knobs.items() if k != "proj_dim"}, proj_dim=knobs["proj_dim"])
    return OnPro(model, opt, buf, cfg, NUM_CLASSES, torch.device("cpu"), seed=2, input_shape=SHAPE)


@pytest.mark.parametrize(
    "knobs", [SPEC, OTHER, ROW_GATE, BATCH_GATE], ids=["official_defaults", "other_knobs", "row_gate", "batch_gate"]
)
@pytest.mark.slow
def test_onpro_steps_match_reference(knobs):
    """Tasks 0-2 of the digits stream (3 x 10 batches; the second task's replay batch is sized by the seen
    classes, APF from each task's second batch): at every step, loss and every gradient (model and projection
    head) equal the reference's, computed from the parameters before the step. With the row gate (the default)
    some call mixes part of its base rows; with `mixup_row_gate=false` every call mixes all of them or none."""
    ds = _digits()
    method = build(knobs)
    stream = ClassIncrementalStream(ds, N_TASKS, BATCH, order=ORDER, seed=0)
    assert [task.classes.tolist() for task in stream.tasks] == TASK_CLASSES
    learner = Learner(stream, method, progress=False, anytime_every=0, log_every=10**9)
    samples, rec = SampleLog(method.buffer), Recorder(method)
    captured = {}
    params = list(method.model.parameters()) + list(method.projection.parameters())
    original = method.step

    def step(loss):
        captured["loss"] = loss.detach().clone()
        original(loss)
        captured["grads"] = [p.grad.detach().clone() for p in params]

    method.step = step
    ref, seen, mixed, partial = Ref(), set(), 0, 0
    for batch in make_batches(ds)[:25]:
        model64 = copy.deepcopy(method.model).double()
        proj64 = copy.deepcopy(method.projection).double()
        snap = BufferSnapshot.of(method.buffer)
        samples.reset(), rec.reset(), captured.clear()
        learner.train_batch(batch)
        seen |= set(batch.y.tolist())
        mixed += sum(int((a[2][3] > 0).sum()) for a in rec.apf)
        for (_, _, size), _, out in rec.apf:
            on = int((out[3][: int(size * knobs["mixup_base_rate"])] > 0).sum())
            partial += 0 < on < int(size * knobs["mixup_base_rate"])
        loss, grads = onpro_reference(model64, proj64, batch, seen, list(samples.calls), rec, snap, ref, knobs)
        where = f"task {batch.task}, batch {batch.step_in_task}"
        torch.testing.assert_close(
            captured["loss"].double(), loss, rtol=RTOL, atol=ATOL, msg=lambda m, where=where: f"{where}: {m}"
        )
        for g, g_ref in zip(captured["grads"], grads, strict=True):
            torch.testing.assert_close(
                g.double(), g_ref, rtol=RTOL, atol=ATOL, msg=lambda m, where=where: f"grad at {where}: {m}"
            )
    assert mixed > 0, "some replayed rows were mixed"
    if knobs is ROW_GATE:
        assert partial > 0, "the row gate mixes part of a call's base rows"
    if knobs is BATCH_GATE:
        assert partial == 0, "without the row gate a call mixes all its base rows or none"


def test_apf_pair_selection_on_hand_made_prototypes():
    """Four classes with prototypes on a line (0 and 1 closest): the pair counts are round(m softmax(1/d))
    with the official fix of the total; absent classes get no pair; the rows come grouped by pair, each mixing
    buffer rows of its two classes."""
    method = build(SPEC)
    c = torch.zeros(NUM_CLASSES, SPEC["proj_dim"])
    pos = {0: 0.0, 1: 0.3, 2: 0.9, 3: 1.5}
    for k, v in pos.items():
        c[k, 0] = v
    method.proto_mean, method.proto_present = c, torch.zeros(NUM_CLASSES, dtype=torch.bool)
    method.proto_present[list(pos)] = True
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    inv = torch.tensor([1 / abs(pos[a] - pos[b]) for a, b in pairs], dtype=torch.float64)
    # m = 16: the rounded counts [10, 1, 1, 2, 1, 2] sum to 17, one is taken from a random pair that has some;
    # m = 7: [4, 0, 0, 1, 0, 1] sum to 6, one is added to a random pair
    for m, short in [(16, -1), (7, 1)]:
        expect = torch.round(torch.softmax(inv, 0) * m)
        assert m - int(expect.sum()) == short
        seen_pairs = set()
        for _ in range(30):
            counts = method.apf_pair_counts(m)
            assert int(counts.sum()) == m
            got = {
                (int(a), int(b)): int(k) for a, b, k in zip(method.pair_a, method.pair_b, counts, strict=True) if k > 0
            }
            assert set(got) <= set(pairs), "only pairs of classes with prototypes"
            diff = [got.get(p, 0) - int(e) for p, e in zip(pairs, expect, strict=True)]
            assert sorted(diff) == sorted([0] * 5 + [short])
            seen_pairs.add(diff.index(short))
            if short < 0:
                assert expect[diff.index(short)] > 0
        assert len(seen_pairs) > 1, "the pair that absorbs the rounding is random"
    got = {
        (int(a), int(b)): int(k)
        for a, b, k in zip(method.pair_a, method.pair_b, method.apf_pair_counts(16), strict=True)
    }
    assert got[(0, 1)] >= 9 and all(v <= 3 for p, v in got.items() if p != (0, 1))
    # the rows: buffer rows of the pair's classes, grouped in pair order
    y = torch.tensor([0, 1, 2, 3] * 5)
    x = torch.arange(20, dtype=torch.uint8).repeat_interleave(64).view(20, 1, 8, 8)
    method.buffer.add(x, y, 0)
    xm, ym = method.to_input(x[:16]), y[:16]
    x_mix, ya, yb, lam = method.apf(xm, ym, 16)
    base = int(16 * SPEC["mixup_base_rate"])
    seq = list(zip(ya[base:].tolist(), yb[base:].tolist(), strict=True))
    assert all(p in got for p in seq) and seq == sorted(seq, key=pairs.index)
    for r in range(base, 16):
        va = x_mix[r, 0, 0, 0] * 255
        ok = [(1 - lam[r]) * i + lam[r] * j for i in range(20) for j in range(20) if y[i] == ya[r] and y[j] == yb[r]]
        assert any(abs(float(va - o)) < 1e-3 for o in ok)
    # a class absent from the buffer is replaced by one that is there (with a prototype)
    method.proto_present[5] = True
    method.proto_mean[5, 0] = 0.05  # closest to 0 and 1: pairs (0, 5) and (1, 5) dominate
    _, ya, yb, _ = method.apf(xm, ym, 16)
    assert set(ya.tolist()) | set(yb.tolist()) <= {0, 1, 2, 3}


def test_rotations_and_beta_sampler():
    from cil.core.augment import rotation_views as rotations
    from cil.core.methods.onpro import beta_sample

    x = torch.rand(3, 2, 6, 6)
    assert torch.equal(rotations(x), rotate_ref(x))
    g = torch.Generator().manual_seed(0)
    s = beta_sample(20000, 0.4, g, "cpu").double()
    mean, var = s.mean(), s.var()
    assert abs(mean - 0.5) < 0.01 and abs(var - 0.25 / 1.8) < 0.01  # Beta(a, a): var = 1 / (4 (2a + 1))
    assert float(s.min()) >= 0 and float(s.max()) <= 1
    s2 = beta_sample(20000, 2.0, g, "cpu").double()
    assert abs(s2.var() - 0.25 / 5) < 0.005


@pytest.mark.parametrize(
    "key, value",
    [
        ("method.proj_dim", 0),
        ("method.mixup_p", 1.5),
        ("method.mixup_base_rate", -0.1),
        ("method.ins_temperature", 0),
        ("method.crop_scale", [0.5, 0.2]),
        ("method.per_class_replay", 0),
        ("method.mixup_alpha", 9.0),
        ("method.crop", "nope"),
    ],
)
def test_bad_settings_name_the_key(key, value):
    cfg = OnProConfig(**{key.split(".")[1]: value})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_projection_wider_than_features_is_refused():
    with pytest.raises(ConfigError, match="method.proj_dim"):
        build({**SPEC, "proj_dim": 32})


QUICK = ["method=onpro", "method.replay_batch_size=8", "method.proj_dim=16", "model.hidden=[32]", "threads=1"]
QUICK += ["stream.samples_per_class=80"]  # 80 batches: the kill at 40 falls in task 2, after a checkpoint


@pytest.mark.slow
def test_cli_run_and_resume_after_sigkill_are_bit_identical(tmp_path, monkeypatch):
    """`python -m cil dataset=digits method=onpro` ends with sane results; killed in task 1 (APF at work) and
    resumed, it ends bit for bit where the uninterrupted run ends."""
    root = str(Path(__file__).resolve().parents[1])  # the checkout under test, whatever cil is installed
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ref_dir = tmp_path / "ref" / "run"
    ref_dir.parent.mkdir()
    proc = run_here(ref_dir, [*FAST, *QUICK])
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ref_dir / "results.json").read_text())
    assert res["status"] == "complete" and 10 < res["final_avg_acc"] <= 100 and res["stream_samples"] == 800
    assert len(res["acc_matrix"]) == 5 and all(0 <= a <= 100 for row in res["acc_matrix"] for a in row)
    run_dir = tmp_path / "kill" / "run"
    run_dir.parent.mkdir()
    proc = cli(run_dir, [*FAST, *QUICK], "observe:40:KILL")  # task 1, APF running
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_step(run_dir) > 0
    proc = run_here(run_dir, [*FAST, *QUICK])
    assert proc.returncode == 0, proc.stderr
    assert comparable(run_dir) == comparable(ref_dir)
    assert (run_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()
