"""Several runs of one sweep packed on one device (docs/performance.md, "Packed runs"): K runs of ER or ER-ACE
(seeds, memory sizes, any settings that keep the method's, the model's and the optimizer's kind) step together, so
a GPU that one run at batch 10 leaves waiting on the host gets K runs' arithmetic per launch.

Each run keeps everything of its own, in its own `Learner`: stream, buffer and its host draws, seen classes,
evaluations, metrics. Only the model arithmetic is shared: the K models' parameters and batch-norm statistics are
stacked (`torch.func.stack_module_state`; each run's model then holds views of its slice, so its evaluations read
the current weights), every step runs the method's host work per run (`step_args`: replay draws, masks) and one
`vmap` of its tensor function (`step_loss`, the one the compiled step compiles) over the runs, with the model called
on each run's slice of the stacked weights, then one backward pass; one optimizer of the same kind
and settings steps the stacked parameters (its updates are elementwise, so each slice moves as its run's own
optimizer would move it). Runs whose batches differ in size at a step (a task ending earlier under another class
order) are stepped in groups of equal size, still with one backward pass and one optimizer step; a run whose stream
has ended is left out of the steps that follow.

The arithmetic is the same up to float rounding, not bit for bit: batched matrix products and grouped convolutions
sum in another order than one run's kernels (tests/test_packed.py bounds the difference).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from cil.core.data.stream import Batch
from cil.core.learner import Learner
from cil.core.methods.base import Method, StepOutput
from cil.core.optim import optimizer_like
from cil.errors import ConfigError


@dataclass
class _Queued:
    """One run's share of a packed step: the arguments of its method's tensor function (`step_args`) and the
    output the learner already holds (filled in place once the step has run)."""

    run: int
    args: tuple[Tensor | None, ...]
    out: StepOutput


def packing_blocker(method: Method) -> str | None:
    """Why a run's method cannot be packed, or None."""
    if type(method).step_args is Method.step_args:
        return f"method {method.name} has no packable step (ER and ER-ACE have one)"
    reason = method.compile_blocker()  # add-ons, diagnostics, fp16, ER-ACE's balancing or augmentation
    if reason is not None:
        return reason
    if method.cfg.iters != 1:
        return "method.iters > 1"
    if method.compiler is not None:
        return "compile_step (the packed step is not compiled yet)"
    if len(method.owned):
        return "modules trained beside the model"
    if len(method.optimizer.param_groups) != 1:
        return "an optimizer with several parameter groups"
    return None


def pack_key(learner: Learner) -> tuple[object, ...] | None:
    """Learners with equal keys can be trained in one pack; None: this one is trained alone."""
    if packing_blocker(learner.method) is not None or learner.delay != 1:
        return None
    return tuple(_pack_parts(learner).values())


def _pack_parts(learner: Learner) -> dict[str, object]:
    """What runs of one pack share: the kind of method and model, the optimizer's kind, settings and step, the
    input pipeline and the device."""
    method = learner.method
    optimizer = method.optimizer
    # a resumed run's optimizer: its step count must match
    first: dict[str, Any] = next(iter(optimizer.state.values()), {})
    settings = method.cfg
    if hasattr(settings, "replay_batch_size"):  # a host-side draw: runs of other replay batch sizes share a step
        settings = dataclasses.replace(cast(Any, settings), replay_batch_size=0)
    return {
        "method": type(method),
        "method settings (method.*)": repr(settings),
        "model (model.*)": tuple((name, tuple(t.shape), t.dtype) for name, t in method.model.state_dict().items()),
        "optimizer (optimizer.*)": (type(optimizer), repr(sorted(optimizer.defaults.items()))),
        "optimizer step (a resumed run)": tuple(
            sorted((k, float(v)) for k, v in first.items() if not torch.is_tensor(v) or v.dim() == 0)
        ),
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
        self.names = {name: [model.get_parameter(name) for model in models] for name in self.params}
        for k, model in enumerate(models):  # each run's model reads its slice: evaluations see the current weights
            for name, p in model.named_parameters():
                p.data = self.params[name].data[k]
            for name, module in model.named_modules():
                for key_, value in module._buffers.items():
                    if value is not None:
                        module._buffers[key_] = self.buffers[f"{name}.{key_}" if name else key_][k]
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture, called with each run's slice
        self.optimizer = optimizer_like(methods[0].optimizer, list(self.params.values()))
        self._stack_optimizer_state([method.optimizer for method in methods])
        self.checkpoints: list[_SlicedCheckpoints | None] = [None] * len(self.learners)
        for k, learner in enumerate(self.learners):  # a run's checkpoint holds its slice of the optimizer's state
            if learner.checkpointer is not None:
                self.checkpoints[k] = _SlicedCheckpoints(self, k, learner.checkpointer)
                learner.checkpointer = self.checkpoints[k]
        self.ended = [False] * len(self.learners)
        self.queue: list[_Queued] = []
        for k, method in enumerate(methods):  # the learner's own loop calls it: the step itself waits for all K
            method.observe = functools.partial(self._observe, k)  # type: ignore[method-assign]

    # -- the optimizer's state: stacked from the runs (resumed runs), sliced back for their checkpoints -----------
    def _stack_optimizer_state(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """The runs' optimizer states (resumed runs have them) as the packed optimizer's: per-parameter tensors
        stacked, step counts (equal: pack_key) taken once."""
        if not any(opt.state for opt in optimizers):
            return
        for name, stacked in self.params.items():
            states = [opt.state[p] for opt, p in zip(optimizers, self.names[name], strict=True)]
            self.optimizer.state[stacked] = {
                key: torch.stack([st[key] for st in states])
                if torch.is_tensor(value) and value.dim() > 0
                else (value.clone() if torch.is_tensor(value) else value)
                for key, value in states[0].items()
            }

    def slice_optimizer_state(self, run: int) -> None:
        """Run `run`'s optimizer gets its slice of the packed optimizer's state (copies), as its own would hold."""
        opt = self.learners[run].method.optimizer
        opt.state.clear()
        for name, stacked in self.params.items():
            state = self.optimizer.state.get(stacked)
            if state:
                opt.state[self.names[name][run]] = {
                    key: (value[run] if value.shape == stacked.shape else value).clone()
                    if torch.is_tensor(value)
                    else value
                    for key, value in state.items()
                }

    # -- one step of every run ---------------------------------------------------------------------------------
    def _observe(self, run: int, batch: Batch) -> StepOutput:
        """The method's `observe` up to the arithmetic: the seen classes and the step's host work (`step_args`: the
        replay draw, the masks); the arguments are queued for the packed step, and the learner gets the output it
        will hold, filled when the step runs."""
        method = self.learners[run].method
        method.classes.mark_seen(batch.y, batch.y_host)
        args = method.step_args(batch)
        assert args is not None  # packing_blocker
        device = batch.x.device
        out = StepOutput(torch.empty((), device=device), torch.empty(len(batch.y), method.num_classes, device=device))
        self.queue.append(_Queued(run, args, out))
        return out

    def _run_loss(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], *args: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One run's loss and incoming rows' logits: its method's own tensor function (`step_loss`) with the model
        called on the run's slice of the stacked weights (vmapped over the runs)."""
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
        one optimizer step; fills each run's output."""
        queued, self.queue = self.queue, []
        groups: dict[tuple[object, ...], list[_Queued]] = {}
        for q in queued:
            groups.setdefault(tuple(None if a is None else tuple(a.shape) for a in q.args), []).append(q)
        total: Tensor | None = None
        everyone = len(queued) == len(self.learners)
        for group in groups.values():
            first = group[0].args
            args: list[Tensor | None] = [
                None if a is None else torch.stack([cast(Tensor, q.args[i]) for q in group])
                for i, a in enumerate(first)
            ]
            loss = vmap(self._run_loss, in_dims=(0, 0, *(None if a is None else 0 for a in first)))
            if everyone and len(groups) == 1:  # the usual step: the stacked tensors themselves
                losses, logits = loss(self.params, self.buffers, *args)
            else:  # a subset of the runs: their slices, and their batch-norm statistics written back
                idx = torch.tensor([q.run for q in group])
                device = next(iter(self.params.values())).device
                # pinned, so that the copy to a GPU is queued rather than waited for
                idx = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx
                bufs = {name: t[idx] for name, t in self.buffers.items()}
                losses, logits = loss({n: p[idx] for n, p in self.params.items()}, bufs, *args)
                with torch.no_grad():
                    for name, t in self.buffers.items():
                        t.index_copy_(0, idx, bufs[name])
            with torch.no_grad():
                for i, q in enumerate(group):
                    q.out.loss.copy_(losses[i])
                    q.out.logits.copy_(logits[i])
            total = losses.sum() if total is None else total + losses.sum()
        if total is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

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


class _SlicedCheckpoints:
    """A packed run's checkpointer (the learner's CheckpointHook over the runner's Checkpointer): its checkpoints
    hold the run's slice of the packed optimizer's state, and a stop signal is left to the pack, which takes it
    between rounds (`PackedRuns._stop`) so that one signal stops every run at the same batch."""

    def __init__(self, pack: PackedRuns, run: int, inner: Any) -> None:
        self.pack, self.run, self.inner = pack, run, inner

    def due(self, step: int, task_ends: bool) -> bool:
        return bool(self.inner.scheduled(step, task_ends))

    def checkpoint(self, learner: Learner) -> None:
        self.pack.slice_optimizer_state(self.run)
        self.inner.save(learner)

    def stopping(self) -> bool:
        return self.inner.stop_signal is not None

    def stop(self, learner: Learner) -> None:
        """Checkpoint, then raise Preempted (the runner's Checkpointer.checkpoint)."""
        self.pack.slice_optimizer_state(self.run)
        self.inner.checkpoint(learner)
