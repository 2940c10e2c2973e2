"""OCM (method=ocm): the assembled step against an independent reference, a CLI run, bit-identical resume after
SIGKILL, and config errors.

The reference is written here from the official code's equations (gydpku/OCM, test_cifar10.py and
InfoNCE/contrastive_learning.py), in float64, with per-image Python where that is clearest; it shares nothing with
`cil` but its inputs and the random draws the method made, which are recorded:
- the buffer draws (`buffer.sample`), checked to be min(asked, available) distinct buffer rows, with
  asked = min(64, 7 * |seen classes|);
- every augmentation's final application (grayscale + crop, `apply_grid`): the reference builds the tensor the code
  augments, checks that the recorded input is it with some rows flipped horizontally (the random flip comes
  first) and uses the recorded output;
- the random start of each feature window.
Loss and the gradient of every parameter (model and projection head) are compared at every step of three tasks.
"""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from conftest import REPO
from test_reference_steps import (
    BATCH,
    BUFFER_SIZE,
    N_TASKS,
    NUM_CLASSES,
    ORDER,
    SHAPE,
    TASK_CLASSES,
    BufferSnapshot,
    Draws,
    SampleLog,
    _digits,
    make_batches,
)
from test_resume import cli, comparable, run_here

from cil.core.buffer import ReplayBuffer
from cil.core.data.stream import ClassIncrementalStream
from cil.core.learner import Learner
from cil.core.methods.ocm import OCM, OCMConfig
from cil.core.models import build_model
from cil.errors import ConfigError

RTOL, ATOL = 1e-5, 1e-6
TAU, EPS = 0.07, 1e-8
PROJ = 8  # projection width for the 32-wide test MLP


# ---------------------------------------------------------------------------------------------------------------
# The reference (official code's equations)
# ---------------------------------------------------------------------------------------------------------------
def expand16(x: torch.Tensor) -> torch.Tensor:
    """Official Rotation(x): X = [x, left half turned 180, both halves, right half]; [X, rot180, rot90, rot270]."""
    w = x.shape[-1]
    half = w // 2

    def turn(img, left, right):
        out = img.clone()
        if left:
            out[..., :, :half] = img[..., :, :half].flip(-1).flip(-2)
        if right:
            out[..., :, half:] = img[..., :, half:].flip(-1).flip(-2)
        return out

    inner = [torch.stack([turn(img, a, b) for img in x]) for a, b in ((0, 0), (1, 0), (1, 1), (0, 1))]
    big = torch.cat(inner)
    return torch.cat([big, torch.rot90(big, 2, (2, 3)), torch.rot90(big, 1, (2, 3)), torch.rot90(big, 3, (2, 3))])


def labels16(y: torch.Tensor) -> torch.Tensor:
    return torch.cat([y + 100 * i for i in range(16)])  # the official offsets (any offset >= num_classes works)


def loss_matrix(sim, drop_self):
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(sim / TAU)
    if drop_self:
        e = e * (1 - torch.eye(len(sim), dtype=e.dtype))
    return -torch.log(e / (e.sum(1, keepdim=True) + EPS) + EPS)


def pos_weights(labels):
    m = (labels.view(-1, 1) == labels.view(1, -1)).double()
    return m / (m.sum(1, keepdim=True) + EPS)


def nt_xent_n(sim, labels):  # Supervised_NT_xent_n
    lab = labels.repeat(2)
    b = len(sim) // 2
    lm = loss_matrix(sim, True)
    return (lm[:b, b:].diag().sum() + lm[b:, :b].diag().sum()) / (2 * b) + 2 * (pos_weights(lab) * lm).sum() / (2 * b)


def nt_xent_uni(sim, labels):  # Supervised_NT_xent_uni
    b = len(sim) // 2
    return (pos_weights(labels.repeat(2)) * loss_matrix(sim, False)).sum() / (2 * b)


def nt_xent_pre(sim, labels):  # Supervised_NT_xent_pre
    b = len(sim) // 2
    return (pos_weights(labels) * loss_matrix(sim, False)).sum() / (2 * b)


def normalize(v):
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Recorded:
    def __init__(self, method):
        self.augments, self.starts = [], []
        aug, orig_apply = method.augment, method.augment.apply_grid

        def apply_grid(x, gray, grid):
            out = orig_apply(x, gray, grid)
            self.augments.append((x.detach().clone(), out.detach().clone()))
            return out

        aug.apply_grid = apply_grid
        orig_start = method.window_start

        def window_start():
            s = orig_start()
            self.starts.append(int(s))
            return s

        method.window_start = window_start

    def reset(self):
        self.augments.clear()
        self.starts.clear()

    def augmented(self, x, used):
        """simclr_aug(x) as drawn: the recorded call whose input is x with some rows flipped."""
        for i, (inp, out) in enumerate(self.augments):
            if i in used or inp.shape != x.shape:
                continue
            same = (inp == x).flatten(1).all(1)
            flipped = (inp == x.flip(-1)).flatten(1).all(1)
            if bool((same | flipped).all()):
                used.add(i)
                return out.double()
        raise AssertionError(f"no augmentation of a {tuple(x.shape)} tensor (hflip, then grayscale/crop) was made")


def ocm_reference(model, proj, prev, batch, seen, draws, rec: Recorded, first_task_w=1.0, w=0.5):
    """One OCM step from the official code (test_cifar10.py): returns (loss, grads, info)."""
    to_unit = lambda v: v.to(torch.float32) / 255.0  # noqa: E731
    used: set[int] = set()
    starts = list(rec.starts)
    x, y = to_unit(batch.x), batch.y
    d = model.head.in_features
    for s in starts:
        assert 0 <= s < d - PROJ, "feature window out of range"

    def sims(z, fn, start, weight):
        return weight * (z @ z.t()) + weight * (z @ fn[:, start : start + PROJ].t())

    info = {}
    if batch.task == 0:
        x16 = expand16(x)
        pair = torch.cat([x16.double(), rec.augmented(x16, used)])
        f = model.features(pair)
        z, fn = normalize(proj(f)), normalize(f)
        loss_sim = nt_xent_n(sims(z, fn, starts[0], first_task_w), labels16(y))
        y_pred = model(rec.augmented(x, used))
        loss = torch.nn.functional.cross_entropy(y_pred, y) + loss_sim
        info["n_replay"] = 0
    else:
        want = min(64, 7 * len(seen))
        mem_x, mem_y = draws.rows(want, "replay rows", {}, torch.ones(len(draws.buffer.y), dtype=torch.bool))
        info["n_replay"], info["want"] = len(mem_y), want
        xm = to_unit(mem_x)
        x16, m16 = expand16(x), expand16(xm)
        both = rec.augmented(torch.cat([x16, m16]), used)
        pair = torch.cat([x16.double(), both[: len(x16)]])
        pair_r = torch.cat([m16.double(), both[len(x16) :]])
        f = model.features(torch.cat([pair, pair_r]))
        u = proj(f)
        n2 = len(pair)
        fn, fn_r = normalize(f[:n2]), normalize(f[n2:])
        z, z_r = normalize(u[:n2]), normalize(u[n2:])
        with torch.no_grad():
            pre_u = normalize(prev[1](prev[0].features(m16.double())))
        loss_sim = nt_xent_n(sims(z, fn, starts[0], w), labels16(y))
        loss_sim_r = nt_xent_uni(sims(z_r, fn_r, starts[1], w), labels16(mem_y))
        loss_pre = nt_xent_pre(z_r[: len(m16)] @ pre_u.t(), labels16(mem_y))
        am = rec.augmented(torch.cat([xm, xm]), used)
        y_label = model(am[: len(mem_y)])
        with torch.no_grad():
            y_label_pre = prev[0](am[len(mem_y) :])
        old = sorted(c for t in range(batch.task) for c in TASK_CLASSES[t])  # ":2*task_id" in the natural order
        mse = ((y_label_pre[:, old] - y_label[:, old]) ** 2).mean()
        loss = torch.nn.functional.cross_entropy(y_label, mem_y) + loss_sim_r + loss_sim + loss_pre + mse
    assert len(used) == len(rec.augments), "the method made augmentations the official step does not"
    assert len(starts) == (1 if batch.task == 0 else 2)
    draws.check_all_used()
    params = list(model.parameters()) + list(proj.parameters())
    return loss.detach(), list(torch.autograd.grad(loss, params)), info


def build(cfg: OCMConfig, seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", SHAPE, NUM_CLASSES, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    buf = ReplayBuffer(BUFFER_SIZE, SHAPE, seed=seed + 1)
    return OCM(model, opt, buf, cfg, NUM_CLASSES, torch.device("cpu"), seed=seed + 2, input_shape=SHAPE)


def run_lockstep(cfg: OCMConfig, check):
    ds = _digits()
    method = build(cfg)
    stream = ClassIncrementalStream(ds, N_TASKS, BATCH, order=ORDER, seed=0)
    learner = Learner(stream, method, progress=False, anytime_every=0, log_every=10**9)
    samples, rec = SampleLog(method.buffer), Recorded(method)
    captured = {}
    original_step = method.step

    def step(loss):
        captured["loss"] = loss.detach().clone()
        original_step(loss)
        captured["grads"] = [p.grad.detach().clone() for p in [*method.model.parameters(), *method.proj.parameters()]]

    method.step = step
    prev, seen, task = None, set(), -1
    for batch in make_batches(ds):
        model64, proj64 = copy.deepcopy(method.model).double(), copy.deepcopy(method.proj).double()
        if batch.task != task:  # the official Previous_model: the model at the end of the last task
            prev = (copy.deepcopy(model64), copy.deepcopy(proj64)) if batch.task > 0 else None
            task = batch.task
        snapshot = BufferSnapshot.of(method.buffer)
        samples.reset()
        rec.reset()
        learner.train_batch(batch)
        seen |= set(batch.y.tolist())
        draws = Draws(samples.calls, [], snapshot)
        loss, grads, info = ocm_reference(model64, proj64, prev, batch, seen, draws, rec)
        check(batch, captured, loss, grads, info)
    return method


@pytest.mark.slow
def test_every_step_matches_the_official_equations():
    """Tasks 0-2 (30 steps): loss and the gradients of every model and projection-head parameter equal the
    reference's; replayed rows min(64, 7 |seen|) (21 at the start of task 1, 42 in task 2)."""
    replayed = []

    def check(batch, captured, loss, grads, info):
        where = f"task {batch.task}, batch {batch.step_in_task}"
        torch.testing.assert_close(
            captured["loss"].double(), loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"loss differs at {where}: {m}"
        )
        assert len(grads) == len(captured["grads"])
        for i, (g, g_ref) in enumerate(zip(captured["grads"], grads, strict=True)):
            torch.testing.assert_close(
                g.double(), g_ref, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"gradient {i} differs at {where}: {m}"
            )
        replayed.append(info["n_replay"])

    run_lockstep(OCMConfig(proj_dim=PROJ), check)
    assert replayed[:10] == [0] * 10
    assert replayed[10] == 21 and replayed[-1] == 42  # 7 x 6 seen classes in task 2


def test_defaults_are_the_official_code():
    cfg = OCMConfig()
    assert (cfg.replay_batch_size, cfg.replay_per_class, cfg.temperature, cfg.proj_dim) == (64, 7, 0.07, 128)
    assert (cfg.sim_weight, cfg.first_task_sim_weight, cfg.grayscale_p, cfg.flip_p) == (0.5, 1.0, 0.25, 0.5)
    assert list(cfg.crop_scale) == [0.3, 1.0] and cfg.crop == "affine" and cfg.ce_classes == "all"
    assert cfg.local_rotations and cfg.distill and OCM.needs_task_boundaries


def test_rotations_are_the_official_expansion():
    from cil.core.augment import rotation_views as rotations

    x = torch.rand(3, 2, 6, 6)
    torch.testing.assert_close(rotations(x, True), expand16(x), rtol=0, atol=0)
    r4 = rotations(x, False)
    assert torch.equal(r4[3:6], torch.rot90(x, 2, (2, 3))) and len(r4) == 12


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("temperature", 0.0, "method.temperature"),
        ("replay_per_class", -1, "method.replay_per_class"),
        ("ce_classes", "task", "method.ce_classes"),
        ("crop_scale", [0.5, 0.2], "method.crop_scale"),
        ("crop", "nope", "method.crop"),
        ("sim_weight", 0, "method.sim_weight"),
        ("grayscale_p", 2, "method.grayscale_p"),
        ("replay_batch_size", 0, "method.replay_batch_size"),
    ],
)
def test_bad_settings_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        OCMConfig(**{key: value}).validate()


def test_projection_wider_than_the_features_is_refused():
    with pytest.raises(ConfigError, match="method.proj_dim"):
        build(OCMConfig(proj_dim=32))


# Adam lr 1e-3 as in the official code (SGD lr 0.1, the digits default, is too large for OCM's tau = 0.07 losses)
FAST = [
    "dataset=digits",
    "method=ocm",
    "optimizer=adam",
    "optimizer.lr=0.001",
    "buffer.size=100",
    "log.progress=false",
    "threads=1",
    "model.hidden=[48]",
    "method.proj_dim=16",
    "method.replay_batch_size=16",
    "log.every=15",
    "checkpoint.every=25",
    "eval.anytime_every=0",
    "stream.samples_per_class=80",  # 80 batches: the kill at 40 falls in task 2, after two checkpoints
]


@pytest.mark.slow
def test_cli_run_and_resume_after_sigkill_is_bit_identical(tmp_path, monkeypatch):
    """A digits run ends with sane results; the same run killed mid-step in task 1 (after a checkpoint, with the
    previous model in it) and resumed ends with the same results, bit for bit."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the runs import this checkout's cil
    ref = tmp_path / "ref"
    proc = run_here(ref, FAST)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ref / "results.json").read_text())
    assert res["status"] == "complete" and len(res["acc_matrix"]) == 5
    assert res["acc_matrix"][0][0] >= 50 and 10 < res["final_avg_acc"] <= 100  # above chance (digits tasks are short)

    run = tmp_path / "run"
    proc = cli(run, FAST, "observe:40:KILL")
    assert proc.returncode == -signal.SIGKILL
    proc = run_here(run, FAST)
    assert proc.returncode == 0, proc.stderr
    assert comparable(run) == comparable(ref)
