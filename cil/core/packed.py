"""Several runs of one sweep packed on one device (docs/performance.md, "Packed runs"): K runs of ER, ER-ACE or GSA
(seeds, memory sizes, optimizers: any settings that keep the method's, the model's and the input pipeline's kind)
step together, so a GPU that one run at batch 10 leaves waiting on the host gets K runs' arithmetic per launch.

Each run keeps everything of its own, in its own `Learner`: stream, buffer and its host draws, seen classes,
evaluations, metrics, optimizer (and fp16's GradScaler). Only the model arithmetic is shared: the K models'
parameters and batch-norm statistics are stacked (`torch.func.stack_module_state`; each run's model then holds
views of its slice, so its evaluations read the current weights and its optimizer moves them), every step runs the
method's host work per run (`step_args`: replay draws, masks, augmentation draws) and one `vmap` of its tensor
function (`step_loss`, the one the compiled step compiles) over the runs, with the model called on each run's slice
of the stacked weights, then one backward pass of the runs' (scaled) losses; each run's optimizer then steps its
own slice with its slice of the gradient (under fp16 its scaler unscales it and skips the step on inf, run by run).
Runs whose batches differ in size at a step (a task ending earlier under another class order, a replay draw of
another size while the buffers fill) are stepped in groups of equal shape, still with one backward pass; a run whose
stream has ended is left out of the steps that follow.

The arithmetic is the same up to float rounding, not bit for bit: batched matrix products and grouped convolutions
sum in another order than one run's kernels (tests/test_packed.py bounds the difference).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from cil.core import compute
from cil.core.data.stream import Batch
from cil.core.learner import Learner
from cil.core.methods.base import Method, StepOutput
from cil.errors import ConfigError


@dataclass
class _Queued:
    """One run's share of a packed step: the arguments of its method's tensor function (`step_args`) and the
    output the learner already holds (filled in place once the step has run)."""

    run: int
    args: tuple[object, ...]
    out: StepOutput


def packing_blocker(method: Method) -> str | None:
    """Why a run's method cannot be packed, or None."""
    if type(method).step_args is Method.step_args:
        return f"method {method.name} has no packable step (ER, ER-ACE and GSA have one)"
    # add-ons, diagnostics, ER-ACE's balancing or augmentation, GSA's host rules and skipped steps
    reason = method.split_blocker() or method.pack_blocker()
    if reason is not None:
        return reason
    if method.cfg.iters != 1:
        return "method.iters > 1"
    if method.compiler is not None:
        return "compile_step (the packed step is not compiled yet)"
    if len(method.owned):
        return "modules trained beside the model"
    return None


def pack_key(learner: Learner) -> tuple[object, ...] | None:
    """Learners with equal keys can be trained in one pack; None: this one is trained alone."""
    if packing_blocker(learner.method) is not None or learner.delay != 1:
        return None
    return tuple(_pack_parts(learner).values())


def _pack_parts(learner: Learner) -> dict[str, object]:
    """What runs of one pack share: the kind of method and model, the input pipeline and the device (each run keeps
    its own optimizer)."""
    method = learner.method
    return {
        "method": type(method),
        "method settings (method.*)": repr(method.pack_settings()),
        "model (model.*)": tuple((name, tuple(t.shape), t.dtype) for name, t in method.model.state_dict().items()),
        "device": str(method.device),
        "input pipeline (precision, channels_last, normalisation)": (
            method.precision,
            method.channels_last,
            None if method.normalize is None else tuple(tuple(t.flatten().tolist()) for t in method.normalize),
        ),
    }


class PackedRuns:
    """K learners (built as for K separate runs) trained together; `run()` returns each one's results."""

    def __init__(self, learners: Sequence[Learner]) -> None:
        if not learners:
            raise ConfigError("packed runs need at least one learner")
        self.learners = list(learners)
        methods = [learner.method for learner in self.learners]
        for k, (learner, method) in enumerate(zip(self.learners, methods, strict=True)):
            reason = packing_blocker(method)
            if reason is None and learner.delay != 1:
                reason = "the real-time mode"
            if reason is not None:
                raise ConfigError(f"run {k} cannot be packed: {reason}")
        parts = _pack_parts(self.learners[0])
        for k, learner in enumerate(self.learners[1:], start=1):
            differs = [name for name, value in _pack_parts(learner).items() if value != parts[name]]
            if differs:
                raise ConfigError(f"run {k} cannot be packed with run 0: its {', '.join(differs)} differs")
        models = [method.model for method in methods]
        self.params, self.buffers = stack_module_state(models)
        # each run's own parameters beside their stacked tensors: its optimizer steps them with its gradient slice
        self.own = [[(model.get_parameter(name), stacked) for name, stacked in self.params.items()] for model in models]
        for k, model in enumerate(models):  # each run's model reads its slice: evaluations see the current weights
            for name, p in model.named_parameters():
                p.data = self.params[name].data[k]
            for name, module in model.named_modules():
                for key_, value in module._buffers.items():
                    if value is not None:
                        module._buffers[key_] = self.buffers[f"{name}.{key_}" if name else key_][k]
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture, called with each run's slice
        self.checkpoints: list[_PackCheckpoints | None] = [None] * len(self.learners)
        for k, learner in enumerate(self.learners):  # a stop signal is taken by the pack, between rounds
            if learner.checkpointer is not None:
                self.checkpoints[k] = _PackCheckpoints(learner.checkpointer)
                learner.checkpointer = self.checkpoints[k]
        self.ended = [False] * len(self.learners)
        self.queue: list[_Queued] = []
        # a learner counts a step's FLOPs around `observe`, which only queues it here: the pack counts the step
        self.flops = [_PackedFlops(learner.flops) for learner in self.learners]
        for learner, meter in zip(self.learners, self.flops, strict=True):
            learner.flops = cast(compute.FlopMeter, meter)
        for k, method in enumerate(methods):  # the learner's own loop calls it: the step itself waits for all K
            method.observe = functools.partial(self._observe, k)  # type: ignore[method-assign]

    # -- one step of every run ---------------------------------------------------------------------------------
    def _observe(self, run: int, batch: Batch) -> StepOutput:
        """The method's `observe` up to the arithmetic: what it does with the batch first (`begin_batch`: the seen
        classes) and the step's host work (`step_args`: the replay draw, the masks, the augmentation draws); the
        arguments are queued for the packed step, and the learner gets the output it will hold, filled when the
        step runs."""
        method = self.learners[run].method
        method.begin_batch(batch)
        args = method.step_args(batch)
        assert args is not None  # packing_blocker
        device = batch.x.device
        out = StepOutput(torch.empty((), device=device), torch.empty(len(batch.y), method.num_classes, device=device))
        self.queue.append(_Queued(run, args, out))
        return out

    def _run_loss(self, params: dict[str, Tensor], buffers: dict[str, Tensor], *args: object) -> tuple[Tensor, ...]:
        """One run's loss, incoming rows' logits and the state its method takes back (`packed_outputs`): its
        method's own tensor function (`step_loss`) with the model called on the run's slice of the stacked weights
        (vmapped over the runs)."""
        method = self.learners[0].method  # every run's method has the same settings (pack_key)
        model = method.model
        method.model = cast(nn.Module, functools.partial(functional_call, self.base, (params, buffers)))
        try:
            outputs = cast(Any, method).step_loss(*args)  # step_args' counterpart (packing_blocker)
        finally:
            method.model = model
        return method.packed_outputs(args, outputs)

    def step(self) -> None:
        """The queued runs' step: one vmapped forward pass per group of equal argument shapes, one backward pass,
        then each run's optimizer on its slice; fills each run's output. When a run's learner asked for its step's
        FLOPs (`_PackedFlops`), the step is counted: each group's forward pass apart, the backward pass shared among
        the groups by their forward FLOPs, a group's count among its runs equally (equal shapes, equal work)."""
        queued, self.queue = self.queue, []
        counting = any(self.flops[q.run].asked for q in queued)
        groups: dict[tuple[object, ...], list[_Queued]] = {}
        for q in queued:  # tensors by shape, host values (a step's sizes) by value
            groups.setdefault(tuple(_shape_or_value(a) for a in q.args), []).append(q)
        losses_of: list[Tensor] = []
        forward_flops: list[int] = []
        for group in groups.values():
            with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as counter:
                losses = self._group_forward(group, everyone=len(groups) == 1 and len(queued) == len(self.learners))
            forward_flops.append(int(counter.get_total_flops()) if counter is not None else 0)
            if self.learners[0].method.scaler is None:
                losses_of.append(losses.sum())
            else:  # fp16: each run's loss times its own scale
                losses_of.extend(self.learners[q.run].method.scaled(losses[i]) for i, q in enumerate(group))
        if not losses_of:
            return
        for p in self.params.values():
            p.grad = None
        with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as counter:
            torch.stack(losses_of).sum().backward()
        if counting:
            backward = int(counter.get_total_flops()) if counter is not None else 0
            total_forward = max(1, sum(forward_flops))
            for group, forward in zip(groups.values(), forward_flops, strict=True):
                share = (forward + backward * forward / total_forward) / len(group)
                for q in group:
                    if self.flops[q.run].asked:
                        self.flops[q.run].asked = False
                        self.flops[q.run].samples.append(round(share))
        for q in queued:
            self._optimizer_step(q.run)

    def _group_forward(self, group: list[_Queued], everyone: bool) -> Tensor:
        """The vmapped tensor function of the runs of one group (equal argument shapes): fills their outputs, hands
        their methods what they take back, returns their losses."""
        first = group[0].args
        args = [
            torch.stack([cast(Tensor, q.args[i]) for q in group]) if isinstance(a, Tensor) else a
            for i, a in enumerate(first)
        ]
        loss = vmap(self._run_loss, in_dims=(0, 0, *(0 if isinstance(a, Tensor) else None for a in first)))
        if everyone:  # the usual step: the stacked tensors themselves
            losses, logits, *kept = loss(self.params, self.buffers, *args)
        else:  # a subset of the runs: their slices, and their batch-norm statistics written back
            idx = torch.tensor([q.run for q in group])
            device = next(iter(self.params.values())).device
            # pinned, so that the copy to a GPU is queued rather than waited for
            idx = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx
            bufs = {name: t[idx] for name, t in self.buffers.items()}
            losses, logits, *kept = loss({n: p[idx] for n, p in self.params.items()}, bufs, *args)
            with torch.no_grad():
                for name, t in self.buffers.items():
                    t.index_copy_(0, idx, bufs[name])
        with torch.no_grad():
            for i, q in enumerate(group):
                q.out.loss.copy_(losses[i])
                q.out.logits.copy_(logits[i])
                self.learners[q.run].method.packed_commit(tuple(t[i] for t in kept))
        return losses

    def _optimizer_step(self, run: int) -> None:
        """Run `run`'s own optimizer (and fp16 scaler) steps its slice of the weights on its slice of the gradient;
        a parameter the run does not train (requires_grad off: a frozen head) gets none."""
        for own, stacked in self.own[run]:
            own.grad = stacked.grad[run] if stacked.grad is not None and own.requires_grad else None
        self.learners[run].method.optimizer_step()

    # -- the runs ----------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Every run's whole stream in lockstep; each run's results as its own `Learner.run` returns them. The first
        error of any run is raised once every run has ended (`run_each` keeps them apart)."""
        outcomes = self.run_each()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return cast(list[dict[str, Any]], outcomes)

    def run_each(self) -> list[dict[str, Any] | BaseException]:
        """Every run's whole stream in lockstep (`Learner.run`'s loop, one packed step per stream position); for
        each run, its results as its own `Learner.run` returns them (taken when its stream ends), or what stopped
        it: a run that raises (a non-finite loss, a file it cannot write, pre-emption after its checkpoint) leaves
        the pack and the others go on."""
        learners = self.learners
        bars = [tqdm(total=len(ln.stream), initial=ln.step, disable=not ln.progress, leave=False) for ln in learners]
        outcomes: list[dict[str, Any] | BaseException | None] = [None] * len(learners)
        ticks = [time.perf_counter()] * len(learners)
        streams = [ln.stream.batches(start=ln.step) for ln in learners]

        def each(runs: list[int], work: Callable[[int], object]) -> list[int]:
            """`work(k)` for every run k; the runs it raised for leave the pack. Returns the runs still in."""
            kept = []
            for k in runs:
                try:
                    work(k)
                    kept.append(k)
                except BaseException as err:  # noqa: BLE001 - the run's own outcome; the stages record it
                    outcomes[k] = err
                    self._leave(k, bars[k])
            return kept

        def finish(k: int) -> None:
            outcomes[k] = self._finish(k, ticks[k], bars[k])

        batches: tuple[Batch | None, ...] = ()  # this round's batch of every run (None: its stream has ended)

        def train(k: int) -> None:
            batch = batches[k]
            assert batch is not None  # only runs with a batch train
            learners[k].train_batch(batch)

        def after(k: int) -> None:  # the learner's own per-batch work (read-backs, evaluations, task ends)
            batch = batches[k]
            assert batch is not None
            ticks[k] = learners[k]._after_batch(batch, bars[k], ticks[k])

        for batches in itertools.zip_longest(*streams):
            # a run whose stream ended: finished before the others step on
            each([k for k, b in enumerate(batches) if b is None and not self.ended[k]], finish)
            active = [k for k, b in enumerate(batches) if b is not None and not self.ended[k]]
            if not active:
                if all(self.ended):  # the runs that left the pack still have batches: not to be read
                    break
                continue
            active = each(active, train)
            try:
                self.step()
            except BaseException as err:  # noqa: BLE001 - the shared step failed: every run in it stops with it
                for k in active:
                    outcomes[k] = err
                    self._leave(k, bars[k])
                break
            active = each(active, after)
            # a stop signal, taken here between rounds: every run checkpoints at this batch, so they resume as a pack
            if any(c.stopping() for k in active if (c := self.checkpoints[k]) is not None):
                each([k for k in active if self.checkpoints[k] is not None], self._stop)
        each([k for k in range(len(learners)) if not self.ended[k]], finish)
        return cast(list[dict[str, Any] | BaseException], outcomes)

    def _detach(self, k: int, bar: tqdm[Any]) -> None:
        """Run k leaves the pack: its model gets weights of its own, which the others' later steps leave alone."""
        self.ended[k] = True
        bar.close()
        model = self.learners[k].method.model
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for key, value in module._buffers.items():
                if value is not None:
                    module._buffers[key] = value.clone()

    def _stop(self, k: int) -> None:
        checkpoints = self.checkpoints[k]
        assert checkpoints is not None  # only runs with a checkpointer are stopped
        checkpoints.stop(self.learners[k])

    def _leave(self, k: int, bar: tqdm[Any]) -> None:
        self.queue = [q for q in self.queue if q.run != k]
        self._detach(k, bar)

    def _finish(self, k: int, tick: float, bar: tqdm[Any]) -> dict[str, Any]:
        """Run k's results, taken as its stream ends."""
        learner = self.learners[k]
        learner.train_time_s += time.perf_counter() - tick
        self._detach(k, bar)
        return learner.results()


class _PackedFlops:
    """A packed run's FLOP meter (the learner's `flops`): asked whether to count a step, it says no (the learner's
    `observe` only queues the step) and remembers the answer, so that the pack counts the step itself."""

    def __init__(self, meter: compute.FlopMeter) -> None:
        self.meter = meter
        self.asked = False

    @property
    def samples(self) -> list[int]:
        return self.meter.samples

    @samples.setter
    def samples(self, value: list[int]) -> None:
        self.meter.samples = value

    def due(self, trained_index: int) -> bool:
        self.asked = self.meter.due(trained_index)
        return False

    def summary(self, trained_batches: int, stream_samples: int) -> dict[str, float | int | str | None] | None:
        return self.meter.summary(trained_batches, stream_samples)


class _PackCheckpoints:
    """A packed run's checkpointer (the learner's CheckpointHook over the runner's Checkpointer): a stop signal is
    left to the pack, which takes it between rounds (`PackedRuns._stop`) so that one signal stops every run at the
    same batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def due(self, step: int, task_ends: bool) -> bool:
        return bool(self.inner.scheduled(step, task_ends))

    def checkpoint(self, learner: Learner) -> None:
        self.inner.save(learner)

    def stopping(self) -> bool:
        return self.inner.stop_signal is not None

    def stop(self, learner: Learner) -> None:
        """Checkpoint, then raise Preempted (the runner's Checkpointer.checkpoint)."""
        self.inner.checkpoint(learner)


def _shape_or_value(arg: object) -> object:
    """A step argument's part of its group's key: a tensor's shape, a host value itself."""
    return ("tensor", tuple(arg.shape)) if isinstance(arg, Tensor) else arg
