"""The assembled training step of GSA, ER-ACE and ER against independent references written here, in plain tensor
code, straight from the specification (docs/gsa.md for GSA; the ER-ACE and ER losses as the methods' docstrings
state them).

The methods run as in a real run: `Learner.train_batch` drives them over a short class-incremental stream of
8x8 digits (our own batches, so the stream is small and every task starts with a batch of one class). At every
step a reference is computed from the model's parameters *before* the step (in float64), the incoming batch and
the buffer's contents, and compared with what the method did: the loss, the gradient of every parameter and,
for GSA, the accumulated statistics G+ / G- (the reference keeps its own, from the start of the stream).

The reference shares nothing with `cil` but its inputs and the random draws the method made:
- the buffer's `sample` is wrapped to record which rows it returned; the reference checks that each draw obeys
  the spec (the right filter, min(asked, available) distinct rows of the buffer) and then uses those rows;
- the augmentation's final application (`GSAAugment.apply_grid`, through which every augmentation passes) is
  wrapped to record (input, output) pairs; the reference builds, on its own, the tensor the spec says is
  augmented, looks up the recorded call whose input is exactly that tensor (for the mixed replay batch: up to a
  row permutation, since the spec shuffles it) and uses that call's output. Every recorded augmentation and
  every non-empty buffer draw must be used by the reference exactly once.
Everything else (Xc, the views and their labels, the new-branch pass, the class sets of each softmax, the
mixed-batch composition, the statistics, the weights, the warm-up, the weighted replay loss, the total) is
computed here. The GSA defaults are the spec's numbers written below, not read from GSAConfig.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from cil.core.buffer import ReplayBuffer
from cil.core.data import load_dataset
from cil.core.data.stream import Batch, ClassIncrementalStream
from cil.core.learner import Learner
from cil.core.methods.er import ER, ERConfig
from cil.core.methods.er_ace import ERACE, ERACEConfig
from cil.core.methods.gsa import GSA, GSAConfig
from cil.core.models import build_model

SHAPE = (1, 8, 8)
NUM_CLASSES = 10
ORDER = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]  # a non-natural class order: statistics must be keyed by label
N_TASKS = 5
TASK_CLASSES = [ORDER[2 * t : 2 * t + 2] for t in range(N_TASKS)]
BATCH = 10
BATCHES_PER_TASK = 10
RUN_TASKS = 3  # tasks 0, 1, 2: in task 2 the buffer holds two earlier tasks and rows of the current one
BUFFER_SIZE = 250  # full at task 2, batch 5: reservoir replacement happens in the last steps


@dataclass(frozen=True)
class Knobs:
    """The numbers of the GSA step. SPEC: docs/gsa.md, steps 1, 3, 6 and 8."""

    R: int = 64  # step 3: rows of the mixed replay batch
    current_task_replay: int = 22  # step 1: buffer rows of the current task joined to Xc
    warmup: int = 5  # step 6: first batches of every task with w = 1
    buffer_loss_weight: float = 2.0  # step 8: L = 2 L_buf + L_new


SPEC = Knobs()
OTHER = Knobs(R=40, current_task_replay=7, warmup=2, buffer_loss_weight=0.5)

# Tolerances: the method computes in float32, the reference in float64.
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits():
    return load_dataset("digits")


def make_batches(ds) -> list[Batch]:
    """BATCHES_PER_TASK batches of BATCH rows for each of the first RUN_TASKS tasks. The first batch of every
    task holds only the task's first class (so r counts seen classes, not all task classes, at task starts);
    the other batches mix the two classes."""
    g = torch.Generator().manual_seed(11)
    batches, step = [], 0
    for t in range(RUN_TASKS):
        a, b = TASK_CLASSES[t]
        ia = torch.nonzero(ds.train_y == a).squeeze(1)
        ib = torch.nonzero(ds.train_y == b).squeeze(1)
        ia, ib = ia[torch.randperm(len(ia), generator=g)], ib[torch.randperm(len(ib), generator=g)]
        n_rest = (BATCHES_PER_TASK - 1) * BATCH
        rest = torch.cat([ia[BATCH : BATCH + n_rest // 2], ib[: n_rest - n_rest // 2]])
        idx = torch.cat([ia[:BATCH], rest[torch.randperm(len(rest), generator=g)]])
        for k in range(BATCHES_PER_TASK):
            rows = idx[k * BATCH : (k + 1) * BATCH]
            y = ds.train_y[rows].clone()
            batches.append(Batch(ds.train_x[rows].clone(), y, y.clone(), t, step, k))
            step += 1
    return batches


def build_method(cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", SHAPE, NUM_CLASSES, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = ReplayBuffer(BUFFER_SIZE, SHAPE, seed=seed + 1)
    return cls(model, opt, buf, cfg, NUM_CLASSES, torch.device("cpu"), seed=seed + 2, input_shape=SHAPE)


# ---------------------------------------------------------------------------------------------------------------
# Recording the method's random draws
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BufferSnapshot:
    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor

    @classmethod
    def of(cls, buffer: ReplayBuffer) -> BufferSnapshot:
        n = len(buffer)
        return cls(buffer.x[:n].clone(), buffer.y[:n].clone(), buffer.task[:n].clone())


class SampleLog:
    """Wraps `buffer.sample`: records (n, filters, (x, y, task)) of every call."""

    def __init__(self, buffer: ReplayBuffer):
        self.calls: list = []
        original = buffer.sample

        def sample(n, **filters):
            out = original(n, **filters)
            self.calls.append((n, dict(filters), tuple(t.clone() for t in out)))
            return out

        buffer.sample = sample

    def reset(self):
        self.calls.clear()


class AugmentLog:
    """Wraps the augmentation's final application: records (input, output) of every call."""

    def __init__(self, augment):
        self.calls: list = []
        original = augment.apply_grid

        def apply_grid(x, gray, grid):
            out = original(x, gray, grid)
            self.calls.append((x.detach().clone(), out.detach().clone()))
            return out

        augment.apply_grid = apply_grid

    def reset(self):
        self.calls.clear()


class Draws:
    """The reference's access to one step's recorded random draws; checks each against the spec."""

    def __init__(self, samples: list, augments: list, buffer: BufferSnapshot):
        self.samples, self.augments, self.buffer = list(samples), list(augments), buffer
        self.used_samples: set[int] = set()
        self.used_augments: set[int] = set()

    # -- buffer draws ---------------------------------------------------------------------------------------
    def rows(self, want: int, what: str, filters: dict, allowed: torch.Tensor):
        """The draw of `want` rows with `filters` (uniform, without replacement, among `allowed` buffer rows):
        checks that it returned min(want, available) distinct rows of the buffer that the filter allows."""
        available = int(allowed.sum())
        expect = min(want, available)
        found = [i for i, (_, f, _) in enumerate(self.samples) if f == filters and i not in self.used_samples]
        if not found:
            assert expect == 0, f"{what}: the method drew no rows with {filters}; the spec wants {expect}"
            return self.buffer.x[:0], self.buffer.y[:0]
        i = found[0]
        self.used_samples.add(i)
        x, y, t = self.samples[i][2]
        assert len(y) == expect, f"{what}: drew {len(y)} rows, the spec wants min({want}, {available}) = {expect}"
        if expect == 0:
            return x, y
        # every row is a distinct buffer row the filter allows
        bx = self.buffer.x.flatten(1)
        match = (
            (x.flatten(1)[:, None] == bx[None]).all(-1)
            & (y[:, None] == self.buffer.y[None])
            & (t[:, None] == self.buffer.task[None])
            & allowed[None]
        )
        taken: set[int] = set()
        for row in range(len(y)):
            slots = [s for s in torch.nonzero(match[row]).squeeze(1).tolist() if s not in taken]
            assert slots, f"{what}: drawn row {row} is not a (distinct) buffer row that {filters} allows"
            taken.add(slots[0])
        return x, y

    # -- augmentations --------------------------------------------------------------------------------------
    def augmented(self, x: torch.Tensor, what: str, any_row_order: bool = False) -> torch.Tensor:
        """A(x) as the method drew it: the output of the recorded call whose input is exactly ``x`` (with
        ``any_row_order``: a row permutation of ``x``; the output is then put back into ``x``'s order)."""
        for i, (inp, out) in enumerate(self.augments):
            if i in self.used_augments or inp.shape != x.shape:
                continue
            if torch.equal(inp, x):
                self.used_augments.add(i)
                return out
            if any_row_order:
                perm = _row_permutation(inp, x)
                if perm is not None:
                    self.used_augments.add(i)
                    return out[perm]
        raise AssertionError(
            f"the method never augmented {what} (shape {tuple(x.shape)}) as the spec says; "
            f"augmented inputs: {[tuple(inp.shape) for inp, _ in self.augments]}"
        )

    def check_all_used(self):
        unused_aug = [tuple(inp.shape) for i, (inp, _) in enumerate(self.augments) if i not in self.used_augments]
        assert not unused_aug, f"the method augmented tensors the spec does not augment: {unused_aug}"
        unused = [
            (n, f, len(out[1]))
            for i, (n, f, out) in enumerate(self.samples)
            if i not in self.used_samples and len(out[1]) > 0
        ]
        assert not unused, f"the method drew buffer rows the spec does not use: {unused}"


def _row_permutation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """perm with a[perm] == b, or None."""
    eq = (b.flatten(1)[:, None] == a.flatten(1)[None]).all(-1)
    taken: set[int] = set()
    perm = []
    for row in range(len(b)):
        cand = [j for j in torch.nonzero(eq[row]).squeeze(1).tolist() if j not in taken]
        if not cand:
            return None
        taken.add(cand[0])
        perm.append(cand[0])
    return torch.tensor(perm, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# The references
# ---------------------------------------------------------------------------------------------------------------
def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """Stored images -> [0, 1] floats (what the method feeds its model; float32, so recorded augmentation
    inputs can be matched exactly)."""
    return x_uint8.to(torch.float32) / 255.0


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def ce_rows(logits: torch.Tensor, y: torch.Tensor, classes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy with the softmax over exactly ``classes`` (the logits restricted to those columns,
    labels re-indexed into them). Returns (per-row loss, log-probabilities [B, |classes|], the columns)."""
    cols = sorted(int(c) for c in classes)
    where = {c: i for i, c in enumerate(cols)}
    z = logits[:, torch.tensor(cols, dtype=torch.long)]
    logp = z - torch.logsumexp(z, dim=1, keepdim=True)
    target = torch.tensor([where[int(c)] for c in y], dtype=torch.long)  # KeyError: a label outside the softmax
    return -logp[torch.arange(len(y)), target], logp, torch.tensor(cols, dtype=torch.long)


@dataclass
class RefStats:
    positive: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_CLASSES, dtype=torch.float64))
    negative: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_CLASSES, dtype=torch.float64))

    def weights(self) -> torch.Tensor:
        """Step 6: w_c = 2 sigmoid(G+_c / G-_c - 1); G-_c = 0: 2 if G+_c > 0 else 1."""
        w = torch.ones(NUM_CLASSES, dtype=torch.float64)
        for c in range(NUM_CLASSES):
            gp, gn = float(self.positive[c]), float(self.negative[c])
            if gn > 0:
                w[c] = 2.0 / (1.0 + torch.exp(torch.tensor(1.0 - gp / gn, dtype=torch.float64)))
            elif gp > 0:
                w[c] = 2.0
        return w


@dataclass
class RefOut:
    loss: torch.Tensor
    grads: list
    info: dict


def gsa_reference(model64, batch: Batch, seen: set, draws: Draws, stats: RefStats, k: Knobs) -> RefOut:
    """One GSA step, docs/gsa.md steps 1-8, from the spec alone. Updates ``stats`` in place."""
    t = batch.task
    task_classes = set(TASK_CLASSES[t])
    buf = draws.buffer
    info: dict = {}

    # 1. Xc = B followed by up to `current_task_replay` buffer rows whose stored task is t.
    cur_x, cur_y = draws.rows(k.current_task_replay, "current-task rows of Xc", {"task": t}, buf.task == t)
    xc = torch.cat([to_unit(batch.x), to_unit(cur_x)])
    yc = torch.cat([batch.y, cur_y])
    info.update(n_xc=len(yc), cur_in_buffer=int((buf.task == t).sum()), buffer_tasks=set(buf.task.tolist()))

    # 2. New-data loss: two views of Xc, one more augmentation pass, CE over C_t only.
    a = draws.augmented(xc, "Xc")
    views = torch.cat([a, hflip(a)])
    y_views = torch.cat([yc, yc])
    views = draws.augmented(views, "the two views of Xc (new-branch pass)")
    logits_new = model64(views.to(torch.float64))
    loss_new = ce_rows(logits_new, y_views, task_classes)[0].mean()
    loss = loss_new

    if len(buf.y) > 0:  # 8. the very first batch (empty buffer): L = L_new
        # 3. Balanced mixed replay batch: floor(R(1-r)) rows of other tasks + the first floor(R r) rows of Xc.
        n_seen, n_seen_cur = len(seen), len(seen & task_classes)
        n_old, n_cur = k.R * (n_seen - n_seen_cur) // n_seen, k.R * n_seen_cur // n_seen
        old_x, old_y = draws.rows(n_old, "other-task rows of the mixed batch", {"exclude_task": t}, buf.task != t)
        xm = torch.cat([to_unit(old_x), xc[:n_cur]])
        ym = torch.cat([old_y, yc[:n_cur]])
        info.update(n_old=n_old, n_cur=n_cur, n_old_drawn=len(old_y))
        am = draws.augmented(xm, "the mixed replay batch", any_row_order=True)
        views_m = torch.cat([am, hflip(am)])
        y_m = torch.cat([ym, ym])
        # 4. softmax over the seen classes
        logits_m = model64(views_m.to(torch.float64))
        nll, logp, cols = ce_rows(logits_m, y_m, seen)
        # 5. statistics on detached p, every row of both views, before the weights
        p = logp.detach().exp()
        onehot = (y_m[:, None] == cols[None, :]).to(torch.float64)
        stats.positive[cols] += ((1.0 - p) * onehot).sum(0)
        stats.negative[cols] += (p * (1.0 - onehot)).sum(0)
        # 6. weights from the updated statistics; w = 1 during the first `warmup` batches of every task
        w = torch.ones(NUM_CLASSES, dtype=torch.float64) if batch.step_in_task < k.warmup else stats.weights()
        info["weights"] = w
        # 7. weighted replay loss; 8. total
        loss_buf = (w[y_m] * nll).mean()
        loss = k.buffer_loss_weight * loss_buf + loss_new
    draws.check_all_used()
    params = list(model64.parameters())
    return RefOut(loss.detach(), list(torch.autograd.grad(loss, params)), info)


def er_ace_reference(model64, batch: Batch, seen: set, draws: Draws, replay: int) -> RefOut:
    """Incoming rows: CE over the classes present in the incoming batch; replay rows: CE over the seen classes;
    L = mean(incoming) + mean(replay)."""
    mem_x, mem_y = draws.rows(replay, "replay rows", {}, torch.ones(len(draws.buffer.y), dtype=torch.bool))
    loss = ce_rows(model64(to_unit(batch.x).double()), batch.y, set(batch.y.tolist()))[0].mean()
    if len(mem_y):
        loss = loss + ce_rows(model64(to_unit(mem_x).double()), mem_y, seen)[0].mean()
    draws.check_all_used()
    return RefOut(loss.detach(), list(torch.autograd.grad(loss, list(model64.parameters()))), {"n_replay": len(mem_y)})


def er_reference(model64, batch: Batch, seen: set, draws: Draws, replay: int) -> RefOut:
    """One CE over the seen classes on the incoming rows followed by the replay rows, mean over all rows."""
    mem_x, mem_y = draws.rows(replay, "replay rows", {}, torch.ones(len(draws.buffer.y), dtype=torch.bool))
    x = torch.cat([to_unit(batch.x), to_unit(mem_x)]).double()
    y = torch.cat([batch.y, mem_y])
    loss = ce_rows(model64(x), y, seen)[0].mean()
    draws.check_all_used()
    return RefOut(loss.detach(), list(torch.autograd.grad(loss, list(model64.parameters()))), {"n_replay": len(mem_y)})


# ---------------------------------------------------------------------------------------------------------------
# Driving a method and its reference in lockstep
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    batch: Batch
    loss: torch.Tensor  # the loss the method stepped on
    grads: list  # the gradients it stepped with
    names: list
    ref: RefOut
    method: object
    seen: set
    ref_stats: RefStats | None = None


def run_lockstep(
    kind: str,
    cfg,
    knobs: Knobs = SPEC,
    until: tuple[int, int] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> StepRecord:
    """Feed the stream to the method through `Learner.train_batch`, computing the reference at every step (from
    the parameters before the step) and handing both to ``on_step``; stop after batch ``until`` = (task,
    step_in_task). Returns the last step's record."""
    ds = _digits()
    cls = {"gsa": GSA, "er_ace": ERACE, "er": ER}[kind]
    method = build_method(cls, cfg)
    stream = ClassIncrementalStream(ds, N_TASKS, BATCH, order=ORDER, seed=0)
    assert [task.classes.tolist() for task in stream.tasks] == TASK_CLASSES
    learner = Learner(stream, method, progress=False, anytime_every=0, log_every=10**9)

    samples = SampleLog(method.buffer)
    augments = AugmentLog(method.gsa.augment) if kind == "gsa" else None
    captured: dict = {}
    original_step = method.step

    def step(loss):
        captured["loss"] = loss.detach().clone()
        original_step(loss)
        captured["grads"] = [p.grad.detach().clone() for p in method.model.parameters()]

    method.step = step
    names = [n for n, _ in method.model.named_parameters()]
    stats = RefStats()
    seen: set[int] = set()
    record = None
    for batch in make_batches(ds):
        model64 = copy.deepcopy(method.model).double()  # the parameters before the step
        snapshot = BufferSnapshot.of(method.buffer)
        samples.reset()
        if augments is not None:
            augments.reset()
        captured.clear()
        learner.train_batch(batch)
        assert "loss" in captured, "the method made no optimizer step"
        seen |= set(batch.y.tolist())
        draws = Draws(samples.calls, augments.calls if augments else [], snapshot)
        if kind == "gsa":
            ref = gsa_reference(model64, batch, seen, draws, stats, knobs)
        elif kind == "er_ace":
            ref = er_ace_reference(model64, batch, seen, draws, cfg.replay_batch_size)
        else:
            ref = er_reference(model64, batch, seen, draws, cfg.replay_batch_size)
        record = StepRecord(
            batch, captured["loss"], captured["grads"], names, ref, method, set(seen), stats if kind == "gsa" else None
        )
        if on_step is not None:
            on_step(record)
        if until is not None and (batch.task, batch.step_in_task) == until:
            break
    return record


def where(r: StepRecord) -> str:
    return f"task {r.batch.task}, batch {r.batch.step_in_task} of the task (stream batch {r.batch.step})"


def assert_loss_and_grads(r: StepRecord):
    torch.testing.assert_close(
        r.loss.double(),
        r.ref.loss,
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"loss differs from the reference at {where(r)}: {m}",
    )
    assert len(r.grads) == len(r.ref.grads)
    for name, g, g_ref in zip(r.names, r.grads, r.ref.grads, strict=True):
        torch.testing.assert_close(
            g.double(),
            g_ref,
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, name=name: f"gradient of {name} differs from the reference at {where(r)}: {m}",
        )


def assert_stats(r: StepRecord):
    stats = r.method.gsa.stats
    torch.testing.assert_close(
        stats.positive.double(),
        r.ref_stats.positive,
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"G+ differs from the reference after {where(r)}: {m}",
    )
    torch.testing.assert_close(
        stats.negative.double(),
        r.ref_stats.negative,
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"G- differs from the reference after {where(r)}: {m}",
    )


def gsa_config(knobs: Knobs) -> GSAConfig:
    if knobs == SPEC:
        return GSAConfig()  # the defaults must be the spec's
    return GSAConfig(
        replay_batch_size=knobs.R,
        current_task_replay=knobs.current_task_replay,
        warmup_batches=knobs.warmup,
        buffer_loss_weight=knobs.buffer_loss_weight,
    )


# ---------------------------------------------------------------------------------------------------------------
# GSA
# ---------------------------------------------------------------------------------------------------------------
def _assert_mid_stream_batch(r: StepRecord, knobs: Knobs):
    """The batch is a real mid-stream one: the buffer holds rows of two earlier tasks and more current-task rows
    than Xc takes, and Xc is longer than its share of the mixed batch (so "the first rows" matters)."""
    info = r.ref.info
    assert {0, 1} <= info["buffer_tasks"] and r.batch.task in info["buffer_tasks"]
    assert info["cur_in_buffer"] > knobs.current_task_replay
    assert info["n_xc"] == BATCH + knobs.current_task_replay
    assert 0 < info["n_cur"] < info["n_xc"] and info["n_old_drawn"] == info["n_old"] > 0


def test_gsa_mid_stream_step_after_warmup_matches_reference():
    """Task 2, batch 5 (the first one after the warm-up), spec defaults: the loss and every parameter's gradient
    equal the reference's, and so do the statistics the method accumulated over the stream."""
    r = run_lockstep("gsa", gsa_config(SPEC), until=(2, SPEC.warmup))
    _assert_mid_stream_batch(r, SPEC)
    assert not torch.equal(r.ref.info["weights"], torch.ones(NUM_CLASSES, dtype=torch.float64)), "weights in use"
    assert_loss_and_grads(r)
    assert_stats(r)


def test_gsa_mid_stream_step_inside_warmup_matches_reference():
    """Task 2, batch 4 (the last warm-up batch, w = 1): loss and gradients equal the reference's."""
    r = run_lockstep("gsa", gsa_config(SPEC), until=(2, SPEC.warmup - 1))
    _assert_mid_stream_batch(r, SPEC)
    assert torch.equal(r.ref.info["weights"], torch.ones(NUM_CLASSES, dtype=torch.float64))
    assert_loss_and_grads(r)
    assert_stats(r)


def test_gsa_statistics_accumulate_like_reference_over_consecutive_steps():
    """G+ and G- after each of the first 30 steps (three tasks: warm-up and weighted batches, task starts) equal
    the reference's running sums; they grow step after step (accumulated, never reset)."""
    totals = []

    def check(r: StepRecord):
        assert_stats(r)
        totals.append(float(r.ref_stats.positive.sum() + r.ref_stats.negative.sum()))

    run_lockstep("gsa", gsa_config(SPEC), on_step=check)
    assert len(totals) == RUN_TASKS * BATCHES_PER_TASK
    assert all(b > a for a, b in itertools.pairwise(totals[1:])), "statistics grow at every step with replay"


@pytest.mark.parametrize("knobs", [SPEC, OTHER], ids=["spec_defaults", "other_knobs"])
def test_gsa_every_step_matches_reference(knobs):
    """Every step of three tasks (the first batch with an empty buffer, task 0 where M is part of Xc, task starts
    with only one class of the task seen, warm-up and weighted batches): loss, gradients, statistics and the
    weights in use equal the reference's. `other_knobs`: the config keys R, current_task_replay, warmup_batches
    and buffer_loss_weight are honoured."""
    single_class_starts = []

    def check(r: StepRecord):
        assert_loss_and_grads(r)
        assert_stats(r)
        if "weights" in r.ref.info:
            seen = sorted(r.seen)
            torch.testing.assert_close(
                r.method.gsa.last_weights.double()[seen], r.ref.info["weights"][seen], rtol=RTOL, atol=ATOL
            )
        if r.batch.task > 0 and r.batch.step_in_task == 0:
            single_class_starts.append(r.ref.info["n_cur"])

    run_lockstep("gsa", gsa_config(knobs), knobs, on_step=check)
    # at the start of task t > 0 one class of 2t + 1 seen ones is current: r = 1 / (2t + 1)
    assert single_class_starts == [knobs.R // 3, knobs.R // 5]


def test_gsa_config_defaults_are_the_spec():
    cfg = GSAConfig()
    assert (cfg.replay_batch_size, cfg.current_task_replay, cfg.warmup_batches, cfg.buffer_loss_weight) == (
        SPEC.R,
        SPEC.current_task_replay,
        SPEC.warmup,
        SPEC.buffer_loss_weight,
    )
    assert cfg.augment and cfg.two_views and not cfg.independent_views and cfg.new_branch_augment
    assert cfg.adaptive_weights and cfg.balanced_replay and cfg.task_only_new_loss


# ---------------------------------------------------------------------------------------------------------------
# ER-ACE and ER
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, cfg", [("er_ace", ERACEConfig()), ("er", ERConfig())], ids=["er_ace", "er"])
def test_replay_baseline_every_step_matches_reference(kind, cfg):
    """ER-ACE and ER (replay_batch_size 10): the loss and every gradient equal the reference's at every step of
    three tasks; the mid-stream batch (task 2, batch 7) has a full replay batch of several tasks."""

    def check(r: StepRecord):
        assert_loss_and_grads(r)

    r = run_lockstep(kind, cfg, on_step=check)
    assert r.batch.task == RUN_TASKS - 1 and r.ref.info["n_replay"] == cfg.replay_batch_size


@pytest.mark.parametrize("kind, cfg", [("er_ace", ERACEConfig()), ("er", ERConfig())], ids=["er_ace", "er"])
def test_replay_baseline_mid_stream_step_matches_reference(kind, cfg):
    """ER-ACE / ER at task 2, batch 7: loss and gradients equal the reference's."""
    r = run_lockstep(kind, cfg, until=(2, 7))
    assert {0, 1, 2} <= set(r.method.buffer.task[: len(r.method.buffer)].tolist())
    assert r.ref.info["n_replay"] == cfg.replay_batch_size
    assert_loss_and_grads(r)
