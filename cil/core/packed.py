"""Several runs of one sweep packed on one device (docs/performance.md, "Packed runs"): K ER runs (seeds, memory
sizes, any settings that keep the model and the optimizer's kind) step together, so a GPU that one run at batch 10
leaves waiting on the host gets K runs' arithmetic per launch.

Each run keeps everything of its own, in its own `Learner`: stream, buffer and its host draws, seen classes,
evaluations, metrics. Only the model arithmetic is shared: the K models' parameters and batch-norm statistics are
stacked (`torch.func.stack_module_state`; each run's model then holds views of its slice, so its evaluations read
the current weights), every step runs one `vmap` of the ER step over the runs, and one optimizer of the same kind
and settings steps the stacked parameters (its updates are elementwise, so each slice moves as its run's own
optimizer would move it). Runs whose batches differ in size at a step (a task ending earlier under another class
order) are stepped in groups of equal size, still with one backward pass and one optimizer step; a run whose stream
has ended is left out of the steps that follow.

The arithmetic is the same up to float rounding, not bit for bit: batched matrix products and grouped convolutions
sum in another order than one run's kernels (tests/test_packed.py bounds the difference).
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from cil.core.data.stream import Batch
from cil.core.learner import Learner
from cil.core.methods.base import Method, StepOutput
from cil.core.methods.er import ER
from cil.core.objectives.er import er_loss
from cil.core.optim import optimizer_like
from cil.errors import ConfigError


@dataclass
class _Queued:
    """One run's share of a packed step: its [incoming; replayed] rows, labels, seen mask, and the output the
    learner already holds (filled in place once the step has run)."""

    run: int
    x: Tensor
    y: Tensor
    seen: Tensor
    out: StepOutput


def packing_blocker(method: Method) -> str | None:
    """Why a run's method cannot be packed, or None."""
    if type(method) is not ER:
        return f"method {method.name}: only ER runs are packed so far"
    if method.cfg.iters != 1:
        return "method.iters > 1"
    if method.addons or method.diagnostics is not None or method.compiler is not None:
        return "add-ons, diagnostics or compile_step"
    if method.scaler is not None:
        return "precision=fp16 (a GradScaler per run)"
    if len(method.optimizer.param_groups) != 1 or method.optimizer.state:
        return "an optimizer with several parameter groups or with state (a resumed run)"
    return None


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
        first = methods[0]
        shapes = {name: t.shape for name, t in first.model.state_dict().items()}
        for k, method in enumerate(methods[1:], start=1):
            if {name: t.shape for name, t in method.model.state_dict().items()} != shapes:
                raise ConfigError(f"run {k} cannot be packed with run 0: its model differs (model.*)")
            opt, opt0 = method.optimizer, first.optimizer
            if type(opt) is not type(opt0) or opt.defaults != opt0.defaults:
                raise ConfigError(f"run {k} cannot be packed with run 0: its optimizer differs (optimizer.*)")
        models = [method.model for method in methods]
        self.params, self.buffers = stack_module_state(models)
        for k, model in enumerate(models):  # each run's model reads its slice: evaluations see the current weights
            for name, p in model.named_parameters():
                p.data = self.params[name].data[k]
            for name, module in model.named_modules():
                for key, value in module._buffers.items():
                    if value is not None:
                        module._buffers[key] = self.buffers[f"{name}.{key}" if name else key][k]
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture, called with each run's slice
        self.optimizer = optimizer_like(first.optimizer, list(self.params.values()))
        self.queue: list[_Queued] = []
        self._loss = vmap(self._run_loss)
        for k, method in enumerate(methods):  # the learner's own loop calls it: the step itself waits for all K
            method.observe = functools.partial(self._observe, k)  # type: ignore[method-assign]

    # -- one step of every run ---------------------------------------------------------------------------------
    def _observe(self, run: int, batch: Batch) -> StepOutput:
        """ER's `observe` up to the arithmetic: the seen classes and the replay draw (host); the rows are queued for
        the packed step, and the learner gets the output it will hold, filled when the step runs."""
        method = self.learners[run].method
        assert isinstance(method, ER)  # checked in __init__
        method.classes.mark_seen(batch.y, batch.y_host)
        mem = method.replay(method.cfg.replay_batch_size)
        x, y = (batch.x, batch.y) if mem is None else (torch.cat([batch.x, mem[0]]), torch.cat([batch.y, mem[1]]))
        device = batch.x.device
        out = StepOutput(torch.empty((), device=device), torch.empty(len(batch.y), method.num_classes, device=device))
        self.queue.append(_Queued(run, x, y, method.seen, out))
        return out

    def _run_loss(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor, seen: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One run's ER loss and logits on its slice of the stacked model (vmapped over the runs)."""
        method = self.learners[0].method
        inputs = method.to_input(x)
        with method.autocast():
            logits = functional_call(self.base, (params, buffers), (inputs,)).float()
        return er_loss(logits, y, seen), logits

    def step(self) -> None:
        """The queued runs' ER step: one vmapped forward pass per group of equal batch shapes, one backward pass,
        one optimizer step; fills each run's output."""
        queued, self.queue = self.queue, []
        groups: dict[tuple[int, ...], list[_Queued]] = {}
        for q in queued:
            groups.setdefault(tuple(q.x.shape), []).append(q)
        total: Tensor | None = None
        everyone = len(queued) == len(self.learners)
        for group in groups.values():
            xs, ys = torch.stack([q.x for q in group]), torch.stack([q.y for q in group])
            seen = torch.stack([q.seen for q in group])
            if everyone and len(groups) == 1:  # the usual step: the stacked tensors themselves
                losses, logits = self._loss(self.params, self.buffers, xs, ys, seen)
            else:  # a subset of the runs: their slices, and their batch-norm statistics written back
                idx = torch.tensor([q.run for q in group])
                if xs.device.type == "cuda":  # pinned, so the copy is queued rather than waited for
                    idx = idx.pin_memory().to(xs.device, non_blocking=True)
                idx = idx.to(xs.device)
                bufs = {name: t[idx] for name, t in self.buffers.items()}
                losses, logits = self._loss({n: p[idx] for n, p in self.params.items()}, bufs, xs, ys, seen)
                with torch.no_grad():
                    for name, t in self.buffers.items():
                        t.index_copy_(0, idx, bufs[name])
            with torch.no_grad():
                for i, q in enumerate(group):
                    q.out.loss.copy_(losses[i])
                    q.out.logits.copy_(logits[i, : len(q.out.logits)])
            total = losses.sum() if total is None else total + losses.sum()
        if total is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    # -- the runs ----------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Every run's whole stream in lockstep (`Learner.run`'s loop, one packed step per stream position); each
        run's results as its own `Learner.run` returns them, taken when its stream ends."""
        learners = self.learners
        bars = [tqdm(total=len(ln.stream), initial=ln.step, disable=not ln.progress, leave=False) for ln in learners]
        results: list[dict[str, Any] | None] = [None] * len(learners)
        ticks = [time.perf_counter()] * len(learners)
        streams = [ln.stream.batches(start=ln.step) for ln in learners]
        for batches in itertools.zip_longest(*streams):
            for k, batch in enumerate(batches):  # a run whose stream ended: finished before the others step on
                if batch is None and results[k] is None:
                    results[k] = self._finish(k, ticks[k], bars[k])
            active = [k for k, batch in enumerate(batches) if batch is not None]
            for k in active:
                learners[k].train_batch(batches[k])
            self.step()
            for k in active:
                # the learner's own per-batch work (read-backs, evaluations, task ends)
                ticks[k] = learners[k]._after_batch(batches[k], bars[k], ticks[k])
        return [self._finish(k, ticks[k], bars[k]) if r is None else r for k, r in enumerate(results)]

    def _finish(self, k: int, tick: float, bar: tqdm[Any]) -> dict[str, Any]:
        """Run k's results; its model gets weights of its own, which the others' later steps leave alone."""
        learner = self.learners[k]
        learner.train_time_s += time.perf_counter() - tick
        bar.close()
        model = learner.method.model
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for key, value in module._buffers.items():
                if value is not None:
                    module._buffers[key] = value.clone()
        return learner.results()
