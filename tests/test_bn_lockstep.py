"""Batch-norm lockstep: every method and add-on on a model WITH batch norm, against float64 references that run
their forward passes as the official code does.

The lockstep tests of tests/test_reference_steps.py (GSA, ER-ACE, ER), test_derpp.py, test_pcr.py, test_ocm.py,
test_onpro.py and test_addons.py use an MLP without batch norm, so they cannot see which rows go through which
forward pass, in which batch-norm mode (train: batch statistics, running statistics moved; eval: running
statistics), or how many passes a step makes. Here the project's ResNet-18 (`build_model("resnet18", nf=4)`, batch
norm after every convolution) runs on the 8x8 digits stream of those tests, driven by `Learner.train_batch`; at
every step a float64 copy of the model taken before the step (parameters AND buffers: running_mean, running_var,
num_batches_tracked) is run through the reference's passes in training mode, and three things are compared:
the loss, the gradient of every trained parameter, and the batch-norm buffers after the step (of the model, and of
MKD's teachers, CCL-DC's peer and OCM's previous model). `num_batches_tracked` counts the train-mode passes
exactly, the running statistics say which rows each pass held and in which order the passes ran; the gradients
see how rows were grouped into passes (each pass normalises by its own batch statistics). Merging two passes,
splitting one, dropping or adding a pass, or running a teacher / peer / previous model in the other mode fails
here.

The passes of each reference, in order, from the official code (commits in docs/protocols.md, "Official code
read"):
- GSA default (ours: the two loss passes only): new-data views, then the mixed replay views
  (docs/methods.md, GSA table, "batch-norm statistics"). `method.bn_extra_passes=true` (official): the passes of
  GSA `GSA_CVPR/test_cifar100.py` lines 454 (contrastive pass over [Xc, A(Xc)]), 471 (new data), 530 (raw
  current rows of the mixed batch), 542-543 (mixed batch; buffer draw + Xc), 579-580 (mixed batch twice), 585
  (background-mixed copy: ours runs the mixed batch itself, methods.md), 600 ([M, A(M)]), 614 (M), 627 (replay
  views, the loss), 628 (replay views again), 762 (the raw incoming batch); all but 471 and 627 without gradient.
- ER: one pass over the incoming and replayed rows (MKD `src/learners/baselines/er.py:81-87`, CCL-DC `erccl.py`).
- ER-ACE: incoming rows, then replayed rows, two passes (AML `methods/er.py:62,73` `observe`: `process_inc`, then
  `process_re`); `method.separate_passes=false` (ours) one pass.
- DER++: incoming, first replay draw, second replay draw: three passes (mammoth `models/derpp.py`).
- PCR: [x, A(x)], then [m, A(m)] (PCR `agents/pcr.py:49,66`, `pcrForward` twice); the first batch: [x, A(x)] alone.
- OCM: [T(x), A(T(x)), T(m), A(T(m))] in one pass, then A(m) for the cross-entropy; the previous model, in
  training mode as the official deep copy (never set to eval), over T(m) then A'(m) (OCM `test_cifar10.py`
  lines 326-327, 379-380, 274 and 401); task 0: [T(x), A(T(x))] then A(x) (236, 262).
- OnPro: first task [R(x), A(R(x))], [M, A(M)] (from the second batch), A(x); later tasks
  [R(x), A(R(x)), R(Mmix), A(R(Mmix))], A(Mmix), [M, A(M)] (OnPro `train.py:84,100-105,114,172,200,204-205`).
- MKD block after the method's passes: student on the raw batch, student on A(batch), each teacher on A(batch)
  in training mode with its own statistics (MKD `src/learners/ema/gsa_ema.py:282-286`; teachers are deep copies
  never set to eval, :57-69); then the EMA update after the optimizer step (:295-297, `update_ema`).
- CCL-DC: each peer over x3, x0, x1, x2, one pass each (CCL-DC `gsaccl.py:375-385`, `erccl.py:97-107`); the peer's
  own method passes come after the collaborative ones here (docs/methods.md, CCL-DC deviation (4); official:
  before), and its optimizer step after the student's (`gsaccl.py:398-404`, `erccl.py:123-129`).
The methods' own losses are the existing references (imported), whose passes are already the official ones above
where they differ from one joint pass; the MKD and CCL-DC terms are written here (tests/test_addons.py's `ref_kd`
and `ref_ce`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import test_derpp
import test_ocm
import test_onpro
import torch
from test_addons import ref_ce, ref_kd
from test_pcr import proxy_supcon_reference
from test_reference_steps import (
    BATCH,
    BUFFER_SIZE,
    N_TASKS,
    NUM_CLASSES,
    ORDER,
    OTHER,
    SHAPE,
    TASK_CLASSES,
    AugmentLog,
    BufferSnapshot,
    Draws,
    Knobs,
    RefOut,
    RefStats,
    SampleLog,
    _digits,
    ce_rows,
    er_ace_reference,
    er_reference,
    gsa_config,
    gsa_reference,
    hflip,
    make_batches,
    to_unit,
)
from torch import nn

from cil.core.addons import build_addons
from cil.core.addons.ccl_dc import CCLDCConfig
from cil.core.addons.mkd import MKDConfig
from cil.core.buffer import ReplayBuffer
from cil.core.data.stream import Batch, ClassIncrementalStream
from cil.core.learner import Learner
from cil.core.methods.base import Method
from cil.core.methods.derpp import DERPP
from cil.core.methods.er import ER, ERConfig
from cil.core.methods.er_ace import ERACE, ERACEConfig
from cil.core.methods.gsa import GSA
from cil.core.methods.ocm import OCM, OCMConfig
from cil.core.methods.onpro import OnPro, OnProConfig
from cil.core.methods.pcr import PCR, PCRConfig
from cil.core.models import build_model

NF = 4  # ResNet-18 widths 4, 8, 16, 32: 32-d features, batch norm everywhere
LR = 0.05  # plain SGD: the updated parameters are p - LR * grad
# float32 against float64 through batch norm: max |got - ref| <= tol * max |ref| + FLOOR, per tensor. Worst cases
# measured over both files: 2.6e-5 for gradients, 1.8e-6 for running statistics. The mutations tried (the report of
# the change that added these files) moved them by 1e-3 or more, except a reordering of GSA's passes outside the
# loss (~1e-4 on the running statistics): hence the tighter bound there.
TOL, TOL_STATS, FLOOR = 1e-4, 2e-5, 1e-7


# ---------------------------------------------------------------------------------------------------------------
# Building and driving a method
# ---------------------------------------------------------------------------------------------------------------
def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", SHAPE, NUM_CLASSES, nf=NF)


def build(cls: type[Method], cfg, seed: int = 0) -> Method:
    model = resnet(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    buf = ReplayBuffer(BUFFER_SIZE, SHAPE, seed=seed + 1, extras=cls.buffer_extras(cfg, NUM_CLASSES))
    return cls(model, opt, buf, cfg, NUM_CLASSES, torch.device("cpu"), seed=seed + 2, input_shape=SHAPE)


def peer_maker(cls: type[Method], cfg, seed: int = 0) -> Callable[[Method], Method]:
    """What cil.run.experiment's make_peer builds for `method`: the same method with its own model (its own seeded
    initialisation) and optimizer, sharing the method's buffer."""

    def make(method: Method) -> Method:
        model = resnet(seed + 7)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        return cls(model, opt, method.buffer, cfg, NUM_CLASSES, torch.device("cpu"), seed=seed + 5, input_shape=SHAPE)

    return make


def with_addon(method: Method, name: str, cfg, make_peer=None) -> Method:
    build_addons({name: cfg}, method, None if make_peer is None else (lambda: make_peer(method)))
    return method


def stream() -> ClassIncrementalStream:
    s = ClassIncrementalStream(_digits(), N_TASKS, BATCH, order=ORDER, seed=0)
    assert [t.classes.tolist() for t in s.tasks] == TASK_CLASSES
    return s


@functools.lru_cache(maxsize=1)
def _all_batches() -> tuple[Batch, ...]:
    return tuple(make_batches(_digits()))


def batches(per_task: int, tasks: int = 3) -> list[Batch]:
    """The first `per_task` batches of each of the first `tasks` tasks of test_reference_steps' stream (the first
    batch of every task holds one class)."""
    return [b for b in _all_batches() if b.task < tasks and b.step_in_task < per_task]


def copy64(module: nn.Module) -> nn.Module:
    """A float64 copy (parameters and buffers) in training mode: the reference's model, whatever mode the original
    is in (the official models are in training mode during a step)."""
    return copy.deepcopy(module).double().train()


class Recorder:
    """Wraps `method.step` (the loss it steps on, the gradients of `params` after backward), the add-ons'
    `extra_loss` (their terms) and any other callable attribute (`mark`: the number of buffer draws made when it
    was called, so a reference can split the draws between the method, the add-on and the peer)."""

    def __init__(self, method: Method, params: list[nn.Parameter] | None = None, samples: SampleLog | None = None):
        self.method = method
        self.params = list(params) if params is not None else list(method.model.parameters())
        self.samples = samples if samples is not None else SampleLog(method.buffer)
        self.loss: torch.Tensor | None = None
        self.grads: list[torch.Tensor | None] = []
        self.extra: dict[str, torch.Tensor | None] = {}
        self.marks: dict[str, int] = {}
        original = method.step

        def step(loss):
            self.loss = loss.detach().clone()
            original(loss)
            self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]

        method.step = step

    def watch_addon(self, addon, key: str) -> None:
        original = addon.extra_loss

        def extra_loss(method):
            self.marks[key] = len(self.samples.calls)
            out = original(method)
            self.extra[key] = None if out is None else out.detach().clone()
            return out

        addon.extra_loss = extra_loss

    def mark(self, obj, attr: str, key: str) -> None:
        original = getattr(obj, attr)

        def marked(*args, **kwargs):
            self.marks[key] = len(self.samples.calls)
            return original(*args, **kwargs)

        setattr(obj, attr, marked)

    def reset(self) -> None:
        self.samples.reset()
        self.loss, self.grads = None, []
        self.extra.clear()
        self.marks.clear()

    def calls(self, start: str | None = None, end: str | None = None) -> list:
        """The buffer draws between two marks (None: the start / the end of the step)."""
        a = 0 if start is None else self.marks[start]
        b = len(self.samples.calls) if end is None else self.marks[end]
        return self.samples.calls[a:b]


@dataclass
class Before:
    """What the reference starts from: float64 copies of the model (and owned modules) before the step, the
    buffer's contents."""

    model64: nn.Module
    owned64: nn.Module  # the method's own trained modules (OCM's and OnPro's projection heads)
    buffer: BufferSnapshot
    logits: torch.Tensor | None  # DER++'s stored logits
    also: dict  # what `also()` returned (teachers, the peer)


def lockstep(
    method: Method, batch_list: list[Batch], rec: Recorder, logs=(), also: Callable[[], dict] = dict
) -> Iterator[tuple[Batch, set, Before]]:
    """Feed `batch_list` to the method through `Learner.train_batch`; yield (batch, seen classes, the state
    before the step) after each step, the recorders holding that step's draws."""
    learner = Learner(stream(), method, progress=False, anytime_every=0, log_every=10**9)
    seen: set[int] = set()
    for batch in batch_list:
        extras = method.buffer._extras
        logits = extras["logits"][: len(method.buffer)].clone() if "logits" in extras else None
        before = Before(copy64(method.model), copy64(method.owned), BufferSnapshot.of(method.buffer), logits, also())
        rec.reset()
        for log in logs:
            log.reset()
        learner.train_batch(batch)
        assert rec.loss is not None, "the method made no optimizer step"
        seen |= set(batch.y.tolist())
        yield batch, set(seen), before


# ---------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------
def where(batch: Batch) -> str:
    return f"task {batch.task}, batch {batch.step_in_task}"


def assert_near(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} against the reference's {tuple(ref.shape)}"
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    bound = tol * (float(ref.abs().max()) if ref.numel() else 0.0) + FLOOR
    assert err <= bound, f"{what} differs from the reference: max error {err:.3g} > {bound:.3g}"


def assert_step(
    batch: Batch, loss: torch.Tensor, grads: list, ref_loss: torch.Tensor, ref_grads, names: list[str], who=""
) -> None:
    at = f"{who}{where(batch)}"
    assert_near(loss, ref_loss, f"the loss at {at}")
    assert len(grads) == len(ref_grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        if r is None or g is None:
            assert g is None or not g.any(), f"{name} has a gradient at {at}; the reference none"
            assert r is None or not r.any(), f"{name} has no gradient at {at}; the reference one"
            continue
        assert_near(g, r, f"the gradient of {name} at {at}")


def assert_bn_state(module: nn.Module, module64: nn.Module, what: str, batch: Batch) -> None:
    """The batch-norm buffers of `module` after the step equal those of the reference's copy after its passes:
    num_batches_tracked (the number of train-mode passes) exactly, running mean and variance closely."""
    theirs = dict(module64.named_buffers())
    mine = dict(module.named_buffers())
    assert mine.keys() == theirs.keys()
    assert any(k.endswith("running_var") for k in mine), f"{what} has no batch norm: the test would see nothing"
    for name, b in mine.items():  # the pass counts first: the plainest message
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(theirs[name]), (
                f"{what}.{name} after {where(batch)}: {int(b)} train-mode passes so far, the reference "
                f"{int(theirs[name])}"
            )
    for name, b in mine.items():
        if not name.endswith("num_batches_tracked"):
            assert_near(b, theirs[name], f"{what}.{name} after {where(batch)}", TOL_STATS)


def sgd_after(params64: list[nn.Parameter], grads: list) -> list[torch.Tensor]:
    """Plain SGD: p - LR * g (the parameters after the optimizer step)."""
    return [p.detach() - (0 if g is None else LR * g) for p, g in zip(params64, grads, strict=True)]


def assert_sgd_step(model: nn.Module, model64: nn.Module, grads: list, who: str, batch: Batch) -> None:
    """The parameters of `model` after its optimizer step are the reference's p - LR * g."""
    for (name, p), e in zip(model.named_parameters(), sgd_after(list(model64.parameters()), grads), strict=True):
        assert_near(p, e, f"the {who}'s {name} after its optimizer step at {where(batch)}")


def grads_of(loss: torch.Tensor, params: list) -> list:
    return list(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))


def add_grads(a: list, b: list) -> list:
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b, strict=True)]


def names_of(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


# ---------------------------------------------------------------------------------------------------------------
# GSA
# ---------------------------------------------------------------------------------------------------------------
def gsa_official_passes_reference(model64, batch: Batch, seen: set, draws: Draws, stats: RefStats, k: Knobs):
    """The GSA step (docs/gsa.md steps 1-8, as test_reference_steps.gsa_reference) with every forward pass of
    the official step, in its order (module docstring: test_cifar100.py lines)."""
    t = batch.task
    task_classes = set(TASK_CLASSES[t])
    buf = draws.buffer

    def f(v):
        return model64(v.to(torch.float64))

    cur_x, cur_y = draws.rows(k.current_task_replay, "current-task rows of Xc", {"task": t}, buf.task == t)
    xc = torch.cat([to_unit(batch.x), to_unit(cur_x)])
    yc = torch.cat([batch.y, cur_y])
    with torch.no_grad():
        f(torch.cat([xc, draws.augmented(xc, "Xc (contrastive pass)")]))  # :454
    a = draws.augmented(xc, "Xc")
    views = draws.augmented(torch.cat([a, hflip(a)]), "the two views of Xc (new-branch pass)")
    loss = ce_rows(f(views), torch.cat([yc, yc]), task_classes)[0].mean()  # :471
    if len(buf.y) > 0:
        n_seen, n_seen_cur = len(seen), len(seen & task_classes)
        n_old, n_cur = k.R * (n_seen - n_seen_cur) // n_seen, k.R * n_seen_cur // n_seen
        old_x, old_y = draws.rows(n_old, "other-task rows of the mixed batch", {"exclude_task": t}, buf.task != t)
        xm = torch.cat([to_unit(old_x), xc[:n_cur]])
        ym = torch.cat([old_y, yc[:n_cur]])
        with torch.no_grad():
            f(xc[:n_cur])  # :530
            f(xm)  # :542
            f(torch.cat([to_unit(old_x), xc]))  # :543
            f(xm)  # :579
            f(xm)  # :580
            f(xm)  # :585, on the background-mixed copy there
            f(torch.cat([xm, draws.augmented(xm, "the mixed batch (contrastive pass)", any_row_order=True)]))  # :600
            f(xm)  # :614
        am = draws.augmented(xm, "the mixed replay batch", any_row_order=True)
        views_m = torch.cat([am, hflip(am)])
        y_m = torch.cat([ym, ym])
        logits_m = f(views_m)  # :627
        nll, logp, cols = ce_rows(logits_m, y_m, seen)
        p = logp.detach().exp()
        onehot = (y_m[:, None] == cols[None, :]).to(torch.float64)
        stats.positive[cols] += ((1.0 - p) * onehot).sum(0)
        stats.negative[cols] += (p * (1.0 - onehot)).sum(0)
        w = torch.ones(NUM_CLASSES, dtype=torch.float64) if batch.step_in_task < k.warmup else stats.weights()
        loss = k.buffer_loss_weight * (w[y_m] * nll).mean() + loss
        with torch.no_grad():
            f(views_m)  # :628
    with torch.no_grad():
        f(to_unit(batch.x))  # :762
    draws.check_all_used()
    return RefOut(loss.detach(), grads_of(loss, list(model64.parameters())), {})


def run_gsa(cfg, reference, knobs: Knobs, per_task: int) -> int:
    method = build(GSA, cfg)
    rec = Recorder(method)
    augments = AugmentLog(method.gsa.augment)
    stats, steps = RefStats(), 0
    names = names_of(method.model)
    for batch, seen, before in lockstep(method, batches(per_task), rec, [augments]):
        draws = Draws(rec.samples.calls, augments.calls, before.buffer)
        ref = reference(before.model64, batch, seen, draws, stats, knobs)
        assert_step(batch, rec.loss, rec.grads, ref.loss, ref.grads, names)
        assert_bn_state(method.model, before.model64, "model", batch)
        assert_near(method.gsa.stats.positive, stats.positive, f"G+ after {where(batch)}")
        assert_near(method.gsa.stats.negative, stats.negative, f"G- after {where(batch)}")
        steps += 1
    return steps


@pytest.mark.slow
def test_gsa_default_step_runs_the_two_loss_passes():
    """GSA (ours, `bn_extra_passes=false`): the new-data views and the mixed replay views, two train-mode passes per
    step (one on the first batch); loss, gradients, statistics and batch-norm state at every step of three tasks
    (warm-up and weighted batches)."""
    assert run_gsa(gsa_config(OTHER), gsa_reference, OTHER, per_task=4) == 12


@pytest.mark.slow
def test_gsa_official_batch_norm_passes_match_the_official_step():
    """`method.bn_extra_passes=true` (with the official affine crop): the official step's passes outside the loss
    (eleven on a batch with replay, two on the first batch), in the official order, move the running statistics;
    the two loss passes and the gradients are as before."""
    cfg = gsa_config(OTHER)
    cfg.bn_extra_passes, cfg.crop = True, "affine"
    assert run_gsa(cfg, gsa_official_passes_reference, OTHER, per_task=4) == 12


# ---------------------------------------------------------------------------------------------------------------
# ER and ER-ACE
# ---------------------------------------------------------------------------------------------------------------
def er_ace_joint_reference(model64, batch: Batch, seen: set, draws: Draws, replay: int) -> RefOut:
    """ER-ACE with `separate_passes=false` (ours): one pass over the incoming rows followed by the replayed rows."""
    mem_x, mem_y = draws.rows(replay, "replay rows", {}, torch.ones(len(draws.buffer.y), dtype=torch.bool))
    n = len(batch.y)
    logits = model64(torch.cat([to_unit(batch.x), to_unit(mem_x)]).double())
    loss = ce_rows(logits[:n], batch.y, set(batch.y.tolist()))[0].mean()
    if len(mem_y):
        loss = loss + ce_rows(logits[n:], mem_y, seen)[0].mean()
    draws.check_all_used()
    return RefOut(loss.detach(), grads_of(loss, list(model64.parameters())), {"n_replay": len(mem_y)})


@pytest.mark.parametrize(
    "cls, cfg, reference",
    [
        (ER, ERConfig(), er_reference),
        (ERACE, ERACEConfig(separate_passes=True), er_ace_reference),
        (ERACE, ERACEConfig(separate_passes=False), er_ace_joint_reference),
    ],
    ids=["er_one_pass", "er_ace_separate_passes", "er_ace_one_pass"],
)
def test_replay_baselines_forward_passes(cls, cfg, reference):
    """ER (one pass over incoming + replayed rows), ER-ACE with `separate_passes=true` (the official two passes:
    incoming, then replayed) and `false` (one pass): loss, gradients and batch-norm state at every step of three
    tasks (the first batch, with an empty buffer, is one pass for all)."""
    method = build(cls, cfg)
    rec = Recorder(method)
    names = names_of(method.model)
    replayed = []
    for batch, seen, before in lockstep(method, batches(3), rec):
        ref = reference(before.model64, batch, seen, Draws(rec.samples.calls, [], before.buffer), 10)
        assert_step(batch, rec.loss, rec.grads, ref.loss, ref.grads, names)
        assert_bn_state(method.model, before.model64, "model", batch)
        replayed.append(ref.info["n_replay"])
    assert replayed[0] == 0 and replayed[-1] == 10


# ---------------------------------------------------------------------------------------------------------------
# DER++
# ---------------------------------------------------------------------------------------------------------------
def test_derpp_three_passes_and_the_stored_logits():
    """DER++ (`separate_passes=true`, augmentation on): incoming, first and second replay draw in three passes;
    loss, gradients, batch-norm state at every step, and the stored logits are the train-mode logits of the
    augmented incoming batch (batch statistics, as the official `outputs.data`)."""
    spec = test_derpp.Spec(alpha=0.5, beta=0.7, replay=12, padding=2)
    cfg = test_derpp.config_of(spec)
    assert cfg.separate_passes
    method = build(DERPP, cfg)
    rec = Recorder(method)
    drec = test_derpp.Recorder(method)
    names = names_of(method.model)
    buf = method.buffer
    stored_checked = 0
    for batch, seen, before in lockstep(method, batches(3), rec, [drec]):
        n = len(before.buffer.y)
        snapshot = (before.buffer.x, before.buffer.y, before.logits)
        loss, grads, logits_new, _ = test_derpp.reference_step(
            before.model64, batch, seen, test_derpp.Draws(drec, snapshot, spec), spec, n
        )
        assert_step(batch, rec.loss, rec.grads, loss, grads, names)
        assert_bn_state(method.model, before.model64, "model", batch)
        for s in range(len(buf)):
            if s >= n or not torch.equal(buf.x[s], before.buffer.x[s]):
                rows = [i for i in range(len(batch.y)) if torch.equal(batch.x[i], buf.x[s])]
                assert_near(buf._extras["logits"][s], logits_new[rows[-1]], f"stored logits at {where(batch)}")
                stored_checked += 1
    assert stored_checked >= 60


# ---------------------------------------------------------------------------------------------------------------
# PCR
# ---------------------------------------------------------------------------------------------------------------
class CallLog:
    """Wraps `obj.attr` (a callable): records (first argument, output) of every call."""

    def __init__(self, obj, attr: str):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = getattr(obj, attr)

        def wrapped(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            self.calls.append((x.detach().clone(), out.detach().clone()))
            return out

        setattr(obj, attr, wrapped)

    def reset(self) -> None:
        self.calls.clear()


def pcr_reference(model64, batch: Batch, draws: Draws, augments: CallLog) -> torch.Tensor:
    """The PCR step (agents/pcr.py): the replay draw, one augmentation call on [incoming; replayed], features of
    [x, A(x)] then of [m, A(m)] (two passes), the proxy SupCon loss; with an empty buffer one pass and 0 * CE."""
    mem_x, mem_y = draws.rows(10, "replay rows", {}, torch.ones(len(draws.buffer.y), dtype=torch.bool))
    draws.check_all_used()
    x_new, x_mem = to_unit(batch.x), to_unit(mem_x)
    assert len(augments.calls) == 1 and torch.equal(augments.calls[0][0], torch.cat([x_new, x_mem]))
    aug = augments.calls[0][1]
    feats_new = model64.features(torch.cat([x_new, aug[: len(x_new)]]).double())  # pcrForward(batch_x_combine)
    if len(mem_y) == 0:  # the official 0 * CE
        return (feats_new @ model64.head.weight.T).sum() * 0.0
    feats_mem = model64.features(torch.cat([x_mem, aug[len(x_new) :]]).double())  # pcrForward(mem_x_combine)
    y = torch.cat([batch.y, batch.y, mem_y, mem_y])
    return proxy_supcon_reference(torch.cat([feats_new, feats_mem]), model64.head.weight, y)


def test_pcr_incoming_and_replayed_rows_in_two_passes():
    """PCR (`separate_passes=true`, official): features of [x, A(x)], then of [m, A(m)], two train-mode passes; the
    first batch (empty buffer) one pass and zero gradients. Loss, gradients and batch-norm state at every step."""
    method = build(PCR, PCRConfig())
    rec = Recorder(method)
    augments = CallLog(method.augment, "apply")
    names = names_of(method.model)
    for batch, _, before in lockstep(method, batches(3), rec, [augments]):
        m64 = before.model64
        loss = pcr_reference(m64, batch, Draws(rec.samples.calls, [], before.buffer), augments)
        assert_step(batch, rec.loss, rec.grads, loss.detach(), grads_of(loss, list(m64.parameters())), names)
        assert_bn_state(method.model, m64, "model", batch)


# ---------------------------------------------------------------------------------------------------------------
# OCM and OnPro
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ocm_one_pass_and_the_previous_model_in_training_mode():
    """OCM: task 0 two passes ([T(x), A(T(x))], then A(x)); later tasks one pass over both pairs and the CE pass,
    and the previous model (the model at the task's start) in training mode over T(m) then A'(m): its outputs use
    batch statistics and its running statistics move, as the official deep copy's. Loss, gradients (model and
    projection head) and the batch-norm state of the model and of the previous model at every step."""
    method = build(OCM, OCMConfig(proj_dim=test_ocm.PROJ))
    rec = Recorder(method, [*method.model.parameters(), *method.proj.parameters()])
    orec = test_ocm.Recorded(method)
    names = names_of(method.model) + [f"proj.{n}" for n in names_of(method.proj)]
    prev, task, with_prev = None, -1, 0
    for batch, seen, before in lockstep(method, batches(3, tasks=2), rec, [orec]):
        proj64 = before.owned64["proj"]
        if batch.task != task:  # the previous model: the model (and head) as the task started
            task = batch.task
            prev = (copy.deepcopy(before.model64), copy.deepcopy(proj64)) if task > 0 else None
            if prev is not None:
                for p, q in zip(
                    method.previous.parameters(), [*prev[0].parameters(), *prev[1].parameters()], strict=True
                ):
                    assert torch.equal(p.double(), q), "the previous model is not the model at the task's start"
        draws = Draws(rec.samples.calls, [], before.buffer)
        loss, grads, _ = test_ocm.ocm_reference(before.model64, proj64, prev, batch, seen, draws, orec)
        assert_step(batch, rec.loss, rec.grads, loss, grads, names)
        assert_bn_state(method.model, before.model64, "model", batch)
        if prev is not None:
            assert_bn_state(method.previous["model"], prev[0], "previous model", batch)
            with_prev += 1
    assert with_prev == 3


@pytest.mark.slow
def test_onpro_passes_in_the_official_order():
    """OnPro (test_onpro's non-default knobs): first task [R(x), A(R(x))], [M, A(M)], A(x); later tasks one pass
    over both rotated pairs, A(Mmix), [M, A(M)] (APF from each task's second batch). Loss, gradients (model and
    projection head) and batch-norm state at every step."""
    knobs = test_onpro.OTHER
    cfg = OnProConfig(**{k: v for k, v in knobs.items() if k != "proj_dim"}, proj_dim=knobs["proj_dim"])
    method = build(OnPro, cfg)
    rec = Recorder(method, [*method.model.parameters(), *method.projection.parameters()])
    orec = test_onpro.Recorder(method)
    names = names_of(method.model) + [f"projection.{n}" for n in names_of(method.projection)]
    ref, mixed = test_onpro.Ref(), 0
    for batch, seen, before in lockstep(method, batches(3, tasks=2), rec, [orec]):
        mixed += sum(int((a[2][3] > 0).sum()) for a in orec.apf)
        loss, grads = test_onpro.onpro_reference(
            before.model64,
            before.owned64["projection"],
            batch,
            seen,
            list(rec.samples.calls),
            orec,
            before.buffer,
            ref,
            knobs,
        )
        assert_step(batch, rec.loss, rec.grads, loss, list(grads), names)
        assert_bn_state(method.model, before.model64, "model", batch)
    assert mixed > 0


# ---------------------------------------------------------------------------------------------------------------
# MKD
# ---------------------------------------------------------------------------------------------------------------
def mkd_alphas(cfg: MKDConfig) -> list[float]:
    """Log-spaced momenta in [alpha_min, alpha_max] (gsa_ema.py:66-73)."""
    import math

    lo, hi, n = math.log10(cfg.alpha_min), math.log10(cfg.alpha_max), cfg.n_teachers
    return [10 ** (lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)]


def mkd_block_reference(
    student64, teachers64, x_u8, y, aug, seen: set, cfg: MKDConfig, head: Callable | None = None
) -> torch.Tensor:
    """The MKD block (gsa_ema.py:270-291): x = [replay draw, incoming]; student on raw x, student on A(x), every
    teacher on A(x) in training mode; weight * (CE(S(A x)) + kd_lambda * mean_j (KD(S(A x)|T_j(A x)) +
    KD(S(x)|T_j(A x))) / 2), softmaxes over the seen classes (`seen_only`). `head(model, x)`: the logits the
    learner distils (default: the model's forward)."""
    logits = head if head is not None else (lambda model, v: model(v))
    cols = sorted(seen)
    a = aug.double()
    s_raw = logits(student64, to_unit(x_u8).double()) if cfg.raw_pass else None  # logits_stu_raw
    s_aug = logits(student64, a)  # logits_stu
    kd = 0.0
    for t64 in teachers64:
        with torch.no_grad():
            t_aug = logits(t64, a)  # logits_tea
        term = ref_kd(s_aug, t_aug, cfg.temperature, cols)
        if s_raw is not None:
            term = (term + ref_kd(s_raw, t_aug, cfg.temperature, cols)) / 2
        kd = kd + term
    return cfg.weight * (ref_ce(s_aug, y, cols) + cfg.kd_lambda * kd / len(teachers64))


def ema_reference(teachers64, alphas, student_after, batches_seen: int, correction_step: int) -> list[list]:
    """update_ema: theta_j <- (1 - a_j) theta_j + a_j / (1 - a_j^k) theta, k = max(1, b // correction_step)."""
    k = max(1, batches_seen // correction_step)
    return [
        [(1 - a) * t.detach() + a / (1 - a**k) * p for t, p in zip(t64.parameters(), student_after, strict=True)]
        for a, t64 in zip(alphas, teachers64, strict=True)
    ]


def assert_teachers(mkd, teachers64, alphas, student_after, batches_seen, cfg, batch) -> None:
    expected = ema_reference(teachers64, alphas, student_after, batches_seen, cfg.correction_step)
    for j, (teacher, t64, params) in enumerate(zip(mkd.teachers, teachers64, expected, strict=True)):
        assert_bn_state(teacher, t64, f"teacher {j}", batch)
        for (name, p), e in zip(teacher.named_parameters(), params, strict=True):
            assert_near(p, e, f"teacher {j}'s {name} after the EMA update at {where(batch)}")


MKD_CFG = dict(n_teachers=2, alpha_min=0.1, alpha_max=0.4, correction_step=3, kd_lambda=2.0, temperature=3.0)


@pytest.mark.slow
def test_mkd_teachers_in_training_mode_after_the_gsa_passes():
    """GSA + MKD (block): after GSA's two passes, the student's raw and augmented passes and each teacher's pass on
    the augmented batch in training mode (batch statistics; the teachers' own running statistics move). Loss
    (GSA's + MKD's), gradients, batch-norm state of the student and of both teachers, and the teachers' parameters
    after the EMA update that follows the optimizer step, at every step of three tasks."""
    cfg = MKDConfig(**MKD_CFG, replay_batch_size=12, weight=0.8)
    method = with_addon(build(GSA, gsa_config(OTHER)), "mkd", cfg)
    mkd = method.addons[0]
    rec = Recorder(method)
    rec.watch_addon(mkd, "mkd")
    augments, mkd_aug = AugmentLog(method.gsa.augment), CallLog(mkd, "augment")
    alphas, stats = mkd_alphas(cfg), RefStats()
    names = names_of(method.model)
    also = lambda: {"teachers": [copy64(t) for t in mkd.teachers]}  # noqa: E731
    steps = lockstep(method, batches(4), rec, [augments, mkd_aug], also)
    for seen_batches, (batch, seen, before) in enumerate(steps, start=1):
        m64, teachers64 = before.model64, before.also["teachers"]
        ref = gsa_reference(m64, batch, seen, Draws(rec.calls(end="mkd"), augments.calls, before.buffer), stats, OTHER)
        draws = Draws(rec.calls(start="mkd"), [], before.buffer)
        mem_x, mem_y = draws.rows(12, "MKD's replay draw", {}, torch.ones(len(before.buffer.y), dtype=torch.bool))
        draws.check_all_used()
        x_u8, y = torch.cat([mem_x, batch.x]), torch.cat([mem_y, batch.y])
        assert len(mkd_aug.calls) == 1 and torch.equal(mkd_aug.calls[0][0], to_unit(x_u8)), "A is not of x"
        loss = mkd_block_reference(m64, teachers64, x_u8, y, mkd_aug.calls[0][1], seen, cfg)
        grads = add_grads(ref.grads, grads_of(loss, list(m64.parameters())))
        assert_step(batch, rec.loss + rec.extra["mkd"], rec.grads, ref.loss + loss.detach(), grads, names)
        assert_bn_state(method.model, m64, "student", batch)
        assert_teachers(mkd, teachers64, alphas, sgd_after(list(m64.parameters()), grads), seen_batches, cfg, batch)


# ---------------------------------------------------------------------------------------------------------------
# CCL-DC
# ---------------------------------------------------------------------------------------------------------------
class ViewLog:
    """CCL-DC's view chain as drawn: T1's crop (input, boxes, output) and every RandAugment call (input, output)."""

    def __init__(self, ccl):
        self.crops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.randaug: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.flipped = self.unflipped = 0
        crop_apply, rand_augment = ccl.crop.apply, ccl.rand_augment

        def apply(x, gray, boxes):
            out = crop_apply(x, gray, boxes)
            self.crops.append((x.clone(), boxes.clone(), out.clone()))
            return out

        def randaug(x):
            out = rand_augment(x)
            self.randaug.append((x.clone(), out.clone()))
            return out

        ccl.crop.apply, ccl.rand_augment = apply, randaug

    def reset(self) -> None:
        self.crops.clear()
        self.randaug.clear()

    def chain(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """x0..x3 as the official chain builds them (baseccl.py:97-125, gsaccl.py:370-372): x1 = T1(x0) (resized
        crop, then horizontal flip), x2 = RA(x1), x3 = RA(x2). Checks that the recorded calls are that chain."""
        assert len(self.crops) == 1 and len(self.randaug) == 2, "one crop and two RandAugment calls per update"
        inp, _, cropped = self.crops[0]
        assert torch.equal(inp, x0), "T1's crop is not applied to x0 = [replay draw, incoming] in [0, 1]"
        x1, x2 = self.randaug[0]
        same = (x1 == cropped).flatten(1).all(1)
        flipped = (x1 == cropped.flip(-1)).flatten(1).all(1)
        assert bool((same | flipped).all()), "the first RandAugment's input is not T1(x0) (crop, then flip)"
        self.flipped += int((flipped & ~same).sum())
        self.unflipped += int((same & ~flipped).sum())
        assert torch.equal(self.randaug[1][0], x2), "the second RandAugment is not applied to x2 = RA(x1)"
        return {"x0": x0, "x1": x1, "x2": x2, "x3": self.randaug[1][1]}


PASSES = ("x3", "x0", "x1", "x2")  # each peer's passes in the official order (gsaccl.py:375-385)
CHAIN = (("x3", "x3"), ("x0", "x1"), ("x1", "x2"), ("x2", "x3"))  # KD(f_k(a) | f_l(b)), f_l detached


def ccl_reference(m1, m2, views: dict, y, seen: set, cfg: CCLDCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Both peers' collaborative terms (gsaccl.py:387-396): weight * (ce_weight * sum_v CE(f_k(x_v)) +
    kd_lambda * sum over CHAIN of KD(f_k(a) | f_l(b))), one train-mode pass per peer and view."""
    cols = sorted(seen)
    z1 = {v: m1(views[v].double()) for v in PASSES}
    z2 = {v: m2(views[v].double()) for v in PASSES}

    def side(mine, other):
        ce = sum(ref_ce(mine[v], y, cols) for v in PASSES)
        kd = sum(ref_kd(mine[a], other[b].detach(), cfg.temperature, cols) for a, b in CHAIN)
        return cfg.weight * (cfg.ce_weight * ce + cfg.kd_lambda * kd)

    return side(z1, z2), side(z2, z1)


def ccl_parts(method: Method, rec: Recorder):
    """The add-on, its peer and the recorders of a CCL-DC run: the student's draws end where the collaborative term
    starts ("ccl"), the peer's own step starts at "peer"."""
    ccl = method.addons[0]
    peer = ccl.peer
    rec.watch_addon(ccl, "ccl")
    rec.mark(peer, "update", "peer")
    prec = Recorder(peer, samples=rec.samples)
    prec.watch_addon(ccl.link, "link")
    return ccl, peer, prec


@pytest.mark.slow
def test_ccl_dc_peers_in_training_mode_one_pass_per_view():
    """ER + CCL-DC: the student's ER pass, the four view passes of each peer in training mode, the student's step,
    then the peer's ER pass and step. Both peers' loss (the method's + the collaborative term), gradients,
    batch-norm state and parameters after their optimizer steps, at every step of two tasks."""
    cfg = CCLDCConfig(kd_lambda=2.0, temperature=3.0, replay_batch_size=8, weight=0.9)
    method = with_addon(build(ER, ERConfig()), "ccl_dc", cfg, peer_maker(ER, ERConfig()))
    rec = Recorder(method)
    ccl, peer, prec = ccl_parts(method, rec)
    views = ViewLog(ccl)
    names = names_of(method.model)
    everything = torch.ones(BUFFER_SIZE, dtype=torch.bool)
    also = lambda: {"peer": copy64(peer.model)}  # noqa: E731
    for batch, seen, before in lockstep(method, batches(4, tasks=2), rec, [prec, views], also):
        assert "peer" in rec.marks and prec.loss is not None, f"the peer made no update at {where(batch)}"
        assert prec.extra.get("link") is not None, f"the peer's step lacks its collaborative term at {where(batch)}"
        m1, m2, buf = before.model64, before.also["peer"], before.buffer
        ref1 = er_reference(m1, batch, seen, Draws(rec.calls(end="ccl"), [], buf), 10)
        draws = Draws(rec.calls("ccl", "peer"), [], buf)
        mem_x, mem_y = draws.rows(8, "CCL-DC's replay draw", {}, everything[: len(buf.y)])
        draws.check_all_used()
        y = torch.cat([mem_y, batch.y])
        l1, l2 = ccl_reference(m1, m2, views.chain(to_unit(torch.cat([mem_x, batch.x]))), y, seen, cfg)
        ref2 = er_reference(m2, batch, seen, Draws(rec.calls(start="peer"), [], buf), 10)  # after its CCL passes
        g1 = add_grads(ref1.grads, grads_of(l1, list(m1.parameters())))
        g2 = add_grads(ref2.grads, grads_of(l2, list(m2.parameters())))
        assert_step(batch, rec.loss + rec.extra["ccl"], rec.grads, ref1.loss + l1.detach(), g1, names)
        assert_step(batch, prec.loss + prec.extra["link"], prec.grads, ref2.loss + l2.detach(), g2, names, "peer, ")
        for who, model, model64, grads in (("student", method.model, m1, g1), ("peer", peer.model, m2, g2)):
            assert_bn_state(model, model64, who, batch)
            assert_sgd_step(model, model64, grads, who, batch)
    assert views.flipped > 0 and views.unflipped > 0
