"""The online loop: every incoming batch is observed once, then the method never sees it again except through
the buffer. Evaluation after each task (accuracy matrix) and every `anytime_every` batches on a fixed test
subsample (anytime accuracy). Losses and accuracies stay on the device and are read back only every
`log.every` batches, so the loop never waits for the device between steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from cil.core import compute, metrics
from cil.core.data.stream import Batch, ClassIncrementalStream
from cil.core.methods.base import DiagnosticsHooks, Method, StepOutput
from cil.core.objectives.common import mask_logits
from cil.errors import TrainingError, require

log = logging.getLogger("cil")
LOSS_ALARM = 1e4  # a cross-entropy this large means logits ~1e4 apart: the run has diverged, finite or not


EVAL_CLASSES = ("seen", "all")  # eval.classes: the head units a prediction's argmax spans


@torch.inference_mode()
def predict(
    method: Method, x: torch.Tensor, batch_size: int, head: str | None = None, all_classes: bool = False
) -> torch.Tensor:
    """Predicted label of every row of ``x``: argmax over the seen classes (`all_classes`: over every head unit,
    as mkd_ocl, CCL-DC, OCM, OnPro and PCR evaluate), in eval mode and large batches.
    `head`: an add-on's extra evaluation head (`Method.eval_heads`); None: the run's main head."""
    model = method.model
    was_training = model.training
    model.eval()
    method.owned.eval()
    preds = []
    for i in range(0, len(x), batch_size):
        with method.autocast():
            logits = method.eval_logits(method.to_input(x[i : i + batch_size]), head).float()
        preds.append((logits if all_classes else mask_logits(logits, method.seen)).argmax(1))
    model.train(was_training)
    method.owned.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)


def task_accuracy(pred: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Per-task accuracy in percent. Test samples outside every task (id -1) count towards no task."""
    inside = (task_ids >= 0).float()
    ids = task_ids.clamp(min=0)
    total = torch.bincount(ids, weights=inside, minlength=n_tasks)[:n_tasks]
    correct = torch.bincount(ids, weights=(pred == y).float() * inside, minlength=n_tasks)[:n_tasks]
    return 100.0 * correct.float() / total.float().clamp(min=1)


def evaluate(
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    task_ids: torch.Tensor,
    n_tasks: int,
    batch_size: int,
    all_classes: bool = False,
) -> torch.Tensor:
    """Per-task accuracy in percent, argmax over the seen classes (`all_classes`: every head unit), in eval mode
    and large batches."""
    return task_accuracy(predict(method, x, batch_size, all_classes=all_classes), y, task_ids, n_tasks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """Where the loop's numbers go: the runner's RunLogger writes metrics.csv and TensorBoard; this one drops
    them (a loop driven from a script or a test)."""

    def scalar(self, key: str, value: float, step: int, task: int | None = None) -> None:
        pass

    def accuracy_matrix(self, matrix: list[list[float]], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class CheckpointHook(Protocol):
    """What the loop asks of `Learner.checkpointer` (the runner's cil.run.checkpoint.Checkpointer)."""

    def due(self, step: int, task_ends: bool) -> bool: ...

    def checkpoint(self, learner: Learner) -> None: ...


class Learner:
    """Feeds the stream to the method once, evaluates, and keeps the run's progress.

    seed: picks the anytime-evaluation subsample. eval_batch_size: rows per evaluation forward pass.
    anytime_every / anytime_samples: anytime evaluation every N stream batches (0: off) on a fixed subsample of
    that many test samples. log_every: stream batches between read-backs of the loss. progress: a tqdm bar.
    `checkpointer`: anything with `due(step, task_ends)` and `checkpoint(learner)` (the runner's Checkpointer).
    flops_every: count the FLOPs of every N-th trained step (cil.core.compute.FlopMeter; 0: off). delay: the
    real-time schedule (cil.core.compute.trains; 1: train on every batch); `realtime`: what results.json records
    about it (reference, measured FLOPs), None when the real-time mode is off.
    auc_every_samples: every that many stream samples, accuracy on the whole test set of the classes seen so far
    (the anytime curve whose area is A_AUC, docs/streams.md); 0: off. On a stream that hides its boundaries
    (a blurry stream) the method gets every batch with `task` and `step_in_task` set to None and no
    on_task_start/on_task_end: a task-free method cannot read what it is not given.
    eval_classes: `seen` (argmax over the classes seen so far) or `all` (over every head unit) for every
    prediction the loop counts: task-end, anytime and A_AUC evaluations, the add-ons' heads, online accuracy."""

    def __init__(
        self,
        stream: ClassIncrementalStream,
        method: Method,
        logger: MetricsLog | None = None,
        *,
        seed: int = 0,
        eval_batch_size: int = 256,
        anytime_every: int = 100,
        anytime_samples: int = 500,
        log_every: int = 50,
        progress: bool = True,
        flops_every: int = 0,
        delay: int = 1,
        realtime: dict[str, Any] | None = None,
        auc_every_samples: int = 0,
        eval_classes: str = "seen",
    ) -> None:
        require(eval_classes in EVAL_CLASSES, "eval.classes", eval_classes, f"choose one of {EVAL_CLASSES}")
        self.all_classes = eval_classes == "all"
        self.stream = stream
        self.method = method
        self.logger = logger if logger is not None else MetricsLog()
        self.eval_batch_size, self.anytime_every, self.log_every = eval_batch_size, anytime_every, log_every
        self.progress = progress
        self.flops = compute.FlopMeter(flops_every)
        self.delay, self.realtime = delay, realtime
        self.diagnostics: DiagnosticsHooks | None = method.diagnostics  # cil.core.diagnostics.Diagnostics or None
        self.device = stream.device
        self.n_tasks = stream.n_tasks
        self.test_x, self.test_y = stream.test_x, stream.test_y
        self.test_task = stream.test_task_ids()
        self.class_task = stream.class_task  # task of every head class (-1: in no task)
        # A fixed, seeded test subsample for anytime evaluation, the same at every evaluation point.
        g = torch.Generator().manual_seed(seed + 3)
        n_any = min(anytime_samples, len(self.test_y))
        self.anytime_idx = torch.randperm(len(self.test_y), generator=g)[:n_any].to(self.device)

        self.task = -1  # the task of the last batch observed (its start was announced to the method)
        self.hide_task = stream.hides_boundaries
        self.auc_every = auc_every_samples
        self.track_classes = self.hide_task or auc_every_samples > 0  # A_AUC, A_last, F_last in the results
        # (seen classes, their test indices) of the last anytime point
        self._seen_test: tuple[frozenset[int], torch.Tensor | None] = (frozenset(), None)
        # Everything below is the run's progress: what a checkpoint must hold.
        self.step = 0  # stream batches observed
        self.acc_matrix: list[list[float]] = []
        self.anytime_curve: list[dict[str, Any]] = []
        self.train_time_s = 0.0
        self.task_train_time_s: list[float] = []  # training time of each finished task (a slow-down shows here)
        self.eval_time_s = 0.0
        self.online_correct = torch.zeros((), device=self.device)
        self.online_seen = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.last_log = {"loss": math.nan, "online_acc": math.nan}
        self.warnings: list[str] = []  # what a user should know about the run (results.json `warnings`)
        self.head_matrices: dict[str, list[list[float]]] = {}  # add-ons' extra heads (MKD's teacher...)
        self.seen_classes: set[int] = set()  # labels observed in the stream so far (when track_classes)
        # {"step", "samples", "acc"}: accuracy on the seen classes' test samples
        self.auc_curve: list[dict[str, Any]] = []
        self.class_acc: list[list[float | None]] = []  # per-class accuracy after each task (None: unseen)
        self.errors: dict[str, float] | None = None  # metrics.error_breakdown at the last task end
        self.confusion: np.ndarray | None = None  # its confusion matrix (numpy [C, C])
        self.checkpointer: CheckpointHook | None = None  # set by the runner (cil.run.checkpoint.Checkpointer)
        # (loss, logits, labels, seen mask) of the steps since the last fold (loss None: a batch predicted only)
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def close(self) -> None:
        """Close the metrics log's files (metrics.csv, TensorBoard): `with api.build(...) as learner:` does it."""
        self.logger.close()

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fold(self) -> None:
        """Add the pending steps' losses and online correct counts to the running sums, in a few batched ops
        (device work only, no read-back). Same numbers as per-step accumulation, to float rounding of the loss."""
        if not self._pending:
            return
        step_losses, logits, labels, seen = zip(*self._pending, strict=True)
        losses = [loss for loss in step_losses if loss is not None]  # real-time mode: skipped batches have none
        if losses:
            self.loss_sum += torch.stack(losses).sum()
            self.nonfinite |= ~torch.isfinite(self.loss_sum)
            self.loss_count += len(losses)
        if self.all_classes:
            pred = torch.cat(logits).argmax(1)
        else:
            rows = torch.repeat_interleave(torch.arange(len(labels)), torch.tensor([len(y) for y in labels]))
            masks = torch.stack(seen)[rows.to(self.device)]
            pred = mask_logits(torch.cat(logits), masks).argmax(1)
        self.online_correct += (pred == torch.cat(labels)).sum()
        self._pending.clear()

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate_all(self, tasks_seen: int) -> list[float]:
        """Per-task accuracy on the full test sets; also where the errors go (`self.errors`, `self.confusion`)."""
        pred = predict(self.method, self.test_x, self.eval_batch_size, all_classes=self.all_classes)
        self.confusion = metrics.confusion_matrix(
            self.test_y.cpu().numpy(), pred.cpu().numpy(), self.stream.num_classes
        )
        self.errors = metrics.error_breakdown(self.confusion, self.class_task, tasks_seen)
        return task_accuracy(pred, self.test_y, self.test_task, self.n_tasks).tolist()

    def evaluate_anytime(self, task: int) -> float:
        idx = self.anytime_idx
        acc = evaluate(
            self.method,
            self.test_x[idx],
            self.test_y[idx],
            self.test_task[idx],
            self.n_tasks,
            self.eval_batch_size,
            self.all_classes,
        )
        # Average over the tasks seen so far that have samples in the subsample.
        present = torch.bincount(self.test_task[idx].clamp(min=0), minlength=self.n_tasks)[: task + 1] > 0
        return float(acc[: task + 1][present].mean())

    # -- the loop --------------------------------------------------------------------------------------------
    def train_batch(self, batch: Batch, ahead: Sequence[Batch] = ()) -> StepOutput:
        """The loop body for one incoming batch: the task boundary, the method's step (with the diagnostics'
        hooks), the buffer, and the running online accuracy. Scripts that drive the loop themselves call this.
        `ahead`: real-time mode, the batches that arrive while this step trains (never trained on nor stored):
        their online accuracy counts the predictions of the model before this step, as the stream shows them to
        a model that is busy (each masked to the classes seen once it arrives); `skip_batch` then passes them."""
        method = self.method
        if self.track_classes:
            self.seen_classes.update(batch.y_host.tolist())
        if self.hide_task:  # the method gets no boundary and no task: the measurements below still do
            given = dataclasses.replace(batch, task=None, step_in_task=None)
        else:
            given = batch
            assert batch.task is not None  # the stream's own batch carries its task
            if batch.task != self.task:
                self.task = batch.task
                method.on_task_start(self.task, self.stream.tasks[self.task].classes)
        if self.diagnostics is not None:
            self.diagnostics.begin_batch(batch)
        # real time: the batches that arrive while this step trains, predicted by the model as it is now
        ahead_logits = [self._online_logits(b.x) for b in ahead]
        if self.flops.due(batch.step // self.delay):
            out, flops = compute.count_flops(lambda: method.observe(given))
            self.flops.samples.append(flops)
        else:
            out = method.observe(given)
        if self.diagnostics is not None:
            self.diagnostics.end_batch(self.logger)
        method.remember(given, out)
        self.step += 1
        # Kept as they are and reduced in one go at the next read-back: ~7 small ops per step fewer.
        self._pending.append((out.loss, out.logits, batch.y, method.seen))  # never changed in place
        self.online_seen += len(batch.y)
        seen = method.seen
        for b, logits in zip(ahead, ahead_logits, strict=True):
            seen = seen.index_fill(0, b.y, True)  # its own labels count as seen, as for a trained batch
            self._pending.append((None, logits, b.y, seen))
            self.online_seen += len(b.y)
        return out

    def skip_batch(self, batch: Batch) -> None:
        """Real-time mode: a batch that arrived while the method trained (its online prediction was counted with
        the training step's `ahead`): only the stream position moves."""
        self.step += 1

    @torch.no_grad()
    def _online_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an incoming batch in eval mode (no batch-norm statistics change), without training."""
        method = self.method
        was_training = method.model.training
        method.model.eval()
        method.owned.eval()
        with method.autocast():
            logits = method.eval_logits(method.to_input(x)).float()
        method.model.train(was_training)
        method.owned.train(was_training)
        return logits

    def run(self) -> dict[str, Any]:
        stream = self.stream
        bar = tqdm(
            total=len(stream),
            initial=self.step,
            disable=not self.progress,
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )
        tick = time.perf_counter()
        batches = stream.batches(start=self.step)
        for first in batches:
            if self.delay == 1:
                window = [first]
                self.train_batch(first)
            elif compute.trains(first.step, self.delay):
                # the k-1 batches that arrive while this one trains
                window = [first, *itertools.islice(batches, self.delay - 1)]
                self.train_batch(first, window[1:])
            else:  # resumed between a training step and its skipped batches (already predicted then)
                window = [first]
            for batch in window:
                if batch is not first or not compute.trains(batch.step, self.delay):
                    self.skip_batch(batch)
                tick = self._after_batch(batch, bar, tick)
        self.train_time_s += time.perf_counter() - tick
        bar.close()
        return self.results()

    def _after_batch(self, batch: Batch, bar: tqdm[Any], tick: float) -> float:
        """What follows every stream batch (trained or skipped): read-backs, evaluations, the task end,
        checkpoints. Returns the new training-time origin."""
        stream = self.stream
        bar.update(1)
        task = batch.task
        assert task is not None and batch.step_in_task is not None  # the stream's own batch carries its task
        task_ends = batch.step_in_task + 1 == stream.batches_per_task[task]
        if self.step % self.log_every == 0 or task_ends:
            tick = self._log(task, bar, tick)
        if self.anytime_every and self.step % self.anytime_every == 0 and not task_ends:
            tick = self._timed_eval(tick, lambda: self._anytime(task))
        if self.auc_every and self.online_seen >= self._next_auc_point():
            tick = self._timed_eval(tick, lambda: self._auc_point(task))
        if task_ends:
            tick = self._timed_eval(tick, lambda: self._task_end(task))
            # train_time_s now runs to the evaluation's start (already synchronised): no extra sync here
            self.task_train_time_s.append(self.train_time_s - sum(self.task_train_time_s))
            if not self.hide_task:
                self.method.on_task_end(task)
        if self.checkpointer is not None and self.checkpointer.due(self.step, task_ends):
            tick = self._checkpoint(tick)
        return tick

    def _timed_eval(self, tick: float, fn: Callable[[], object]) -> float:
        """Run an evaluation without counting it as training time; returns the new training-time origin."""
        _sync(self.device)
        start = time.perf_counter()
        self.train_time_s += start - tick
        fn()
        end = time.perf_counter()
        self.eval_time_s += end - start
        return end

    def _checkpoint(self, tick: float) -> float:
        """Write a checkpoint (cil.run.checkpoint), not counted as training time; it raises Preempted after writing
        when SIGTERM asked the run to stop."""
        _sync(self.device)
        self.train_time_s += time.perf_counter() - tick
        assert self.checkpointer is not None  # called only when there is one (_after_batch)
        self.checkpointer.checkpoint(self)
        return time.perf_counter()

    def _anytime(self, task: int) -> None:
        acc = self.evaluate_anytime(task)
        self.anytime_curve.append({"step": self.step, "samples": self.step * self.stream.batch_size, "acc": acc})
        self.logger.scalar("anytime_acc", acc, self.step, task)

    def _next_auc_point(self) -> int:
        """Stream samples at which the next A_AUC point is due (the next multiple of auc_every)."""
        last = self.auc_curve[-1]["samples"] if self.auc_curve else 0
        return (last // self.auc_every + 1) * self.auc_every

    def _auc_point(self, task: int) -> None:
        """Accuracy on every test sample of the classes seen so far (i-Blurry's anytime evaluation)."""
        seen, idx = self._seen_test
        if seen != self.seen_classes:
            seen = frozenset(self.seen_classes)
            classes = torch.tensor(sorted(seen), device=self.device)
            idx = torch.nonzero(torch.isin(self.test_y, classes)).squeeze(1)
            self._seen_test = (seen, idx)
        assert idx is not None  # set above: the seen classes are never the empty start once a batch was observed
        pred = predict(self.method, self.test_x[idx], self.eval_batch_size, all_classes=self.all_classes)
        acc = 100.0 * float((pred == self.test_y[idx]).float().mean()) if len(idx) else 0.0
        self.auc_curve.append({"step": self.step, "samples": self.online_seen, "acc": acc})
        self.logger.scalar("anytime_seen_acc", acc, self.step, task)

    def _task_end(self, task: int) -> None:
        row = self.evaluate_all(task + 1)
        assert self.confusion is not None and self.errors is not None  # set by evaluate_all
        self.acc_matrix.append(row)
        if self.track_classes:  # per-class accuracy of the seen classes, for F_last
            per_class = metrics.class_accuracy(self.confusion)
            self.class_acc.append(
                [
                    None if c not in self.seen_classes or np.isnan(a) else float(a)
                    for c, a in enumerate(per_class.tolist())
                ]
            )
        for head in self.method.eval_heads():  # add-ons' extra heads: one accuracy matrix each
            pred = predict(self.method, self.test_x, self.eval_batch_size, head, self.all_classes)
            head_row = task_accuracy(pred, self.test_y, self.test_task, self.n_tasks).tolist()
            self.head_matrices.setdefault(head, []).append(head_row)
            self.logger.scalar(f"{head}/avg_acc_seen", sum(head_row[: task + 1]) / (task + 1), self.step, task)
        avg = sum(row[: task + 1]) / (task + 1)
        # The end of a task is also an anytime point (on the full test sets of the seen tasks).
        self.anytime_curve.append({"step": self.step, "samples": self.step * self.stream.batch_size, "acc": avg})
        for j, a in enumerate(row[: task + 1]):
            self.logger.scalar(f"acc/task_{j}", a, self.step, task)
        self.logger.scalar("avg_acc_seen", avg, self.step, task)
        for kind, share in self.errors.items():
            self.logger.scalar(f"errors/{kind}", share, self.step, task)
        self.logger.accuracy_matrix(self.acc_matrix, self.step)
        if self.diagnostics is not None:
            self.diagnostics.on_evaluation(task, row, self.logger)
        tqdm.write(
            f"task {task}: average accuracy on tasks 0..{task} = {avg:.2f}%  "
            f"[{' '.join(f'{a:.1f}' for a in row[: task + 1])}]"
        )

    def _log(self, task: int, bar: tqdm[Any], tick: float) -> float:
        """Read the accumulated loss and online accuracy back from the device (the only per-interval sync)."""
        self._fold()
        if self.loss_count == 0:
            return tick
        nonfinite = bool(self.nonfinite)
        loss = float(self.loss_sum) / self.loss_count
        online = 100.0 * float(self.online_correct) / max(self.online_seen, 1)
        if nonfinite:
            raise TrainingError(
                f"the training loss became non-finite (nan or inf) before stream batch {self.step} (task {task}); "
                "the run stopped and the last checkpoint (if any) is kept. Lower optimizer.lr, or use "
                "precision=fp32 if precision=bf16 or fp16"
            )
        if loss > LOSS_ALARM and not self.warnings:
            self.warnings.append(
                f"the training loss reached {loss:.3g} by stream batch {self.step} (task {task}): "
                "training has diverged although the loss is still finite; lower optimizer.lr"
            )
            log.warning("%s", self.warnings[-1])
        self.logger.scalar("loss", loss, self.step, task)
        self.logger.scalar("online_acc", online, self.step, task)
        for key, value in self.method.log_values().items():  # e.g. GSA's per-class weights and ratios
            self.logger.scalar(key, value, self.step, task)
        for addon in self.method.addons:  # the add-ons' loss terms (mkd/kd, ccl_dc/ce...)
            for key, value in addon.log_values().items():
                self.logger.scalar(key, value, self.step, task)
        self.last_log = {"loss": loss, "online_acc": online}
        self.logger.flush()  # a long run's progress is readable (and survives a kill) as it goes
        bar.set_postfix(task=task, loss=f"{loss:.3f}", online_acc=f"{online:.1f}%", refresh=False)
        self.loss_sum.zero_()
        self.loss_count = 0
        return tick

    # -- results ---------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        self._fold()
        acc = self.acc_matrix
        curve = [p["acc"] for p in self.anytime_curve]
        online = 100.0 * float(self.online_correct) / max(self.online_seen, 1)
        peak_cuda = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {
            "acc_matrix": acc,
            "final_avg_acc": metrics.final_average_accuracy(acc),
            "avg_forgetting": metrics.average_forgetting(acc),
            "avg_incremental_acc": metrics.average_incremental_accuracy(acc),
            "anytime_acc": metrics.anytime_accuracy(curve),
            "anytime_curve": self.anytime_curve,
            "online_acc": online,
            "train_time_s": self.train_time_s,
            "task_train_time_s": self.task_train_time_s,
            "eval_time_s": self.eval_time_s,
            "samples_per_s": self.stream.n_samples / self.train_time_s if self.train_time_s > 0 else None,
            "stream_samples": self.stream.n_samples,
            "stream_batches": len(self.stream),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "peak_cuda_mb": peak_cuda,
            "class_order": self.stream.class_order,
            "warnings": self.warnings,
            # Where the test samples go after the last task end; the confusion matrix only up to 100 classes.
            "errors": self.errors,
            "confusion": self.confusion.tolist() if self.confusion is not None and len(self.confusion) <= 100 else None,
            **self.method.extra_results(),
            **{k: v for addon in self.method.addons for k, v in addon.extra_results().items()},
            **(
                {
                    "heads": {
                        head: {
                            "acc_matrix": m,
                            "final_avg_acc": metrics.final_average_accuracy(m),
                            "avg_forgetting": metrics.average_forgetting(m),
                        }
                        for head, m in self.head_matrices.items()
                    }
                }
                if self.head_matrices
                else {}
            ),
            **({"diagnostics": self.diagnostics.summary()} if self.diagnostics is not None else {}),
            "flops": self.flops.summary(compute.trained_batches(self.step, self.delay), self.stream.n_samples),
            "realtime": None
            if self.realtime is None
            else {
                **self.realtime,
                "delay": self.delay,
                "trained_batches": compute.trained_batches(self.step, self.delay),
                "skipped_batches": self.step - compute.trained_batches(self.step, self.delay),
            },
            **(self.blurry_results() if self.track_classes else {}),
        }

    def blurry_results(self) -> dict[str, Any]:
        """A_AUC, A_last and F_last (docs/streams.md), and the curve A_AUC is the area of."""
        curve = self.auc_curve
        rows = [[np.nan if a is None else a for a in row] for row in self.class_acc]
        return {
            "a_auc": metrics.area_under_accuracy([p["samples"] for p in curve], [p["acc"] for p in curve]),
            "a_last": (
                metrics.seen_accuracy(self.confusion, self.seen_classes)
                if self.confusion is not None and self.seen_classes
                else None
            ),
            "f_last": metrics.class_forgetting(rows),
            "auc_curve": curve,
            "auc_every_samples": self.auc_every,
            "class_acc": self.class_acc,
        }

    # -- progress as state (checkpoints) ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {
            "step": self.step,
            "acc_matrix": self.acc_matrix,
            "anytime_curve": self.anytime_curve,
            "train_time_s": self.train_time_s,
            "task_train_time_s": self.task_train_time_s,
            "eval_time_s": self.eval_time_s,
            "online_correct": self.online_correct.cpu(),
            "online_seen": self.online_seen,
            "loss_sum": self.loss_sum.cpu(),
            "loss_count": self.loss_count,
            "errors": self.errors,
            "warnings": self.warnings,
            "confusion": None if self.confusion is None else torch.from_numpy(self.confusion),
            "head_matrices": self.head_matrices,
            "flop_samples": list(self.flops.samples),
            "seen_classes": sorted(self.seen_classes),
            "auc_curve": self.auc_curve,
            "class_acc": self.class_acc,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.acc_matrix = state["acc_matrix"]
        self.anytime_curve = state["anytime_curve"]
        self.train_time_s = state["train_time_s"]
        # absent in older checkpoints: the first task end after resuming then counts every earlier task's time
        self.task_train_time_s = list(state.get("task_train_time_s", []))
        self.eval_time_s = state["eval_time_s"]
        self.online_correct = state["online_correct"].to(self.device)
        self.online_seen = state["online_seen"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.loss_count = state["loss_count"]
        self.errors = state.get("errors")  # absent in older checkpoints
        self.warnings = state.get("warnings", [])
        confusion = state.get("confusion")
        self.confusion = None if confusion is None else confusion.numpy()
        self.head_matrices = state.get("head_matrices", {})
        self.flops.samples = list(state.get("flop_samples", []))  # absent in older checkpoints
        self.seen_classes = set(state.get("seen_classes", []))  # absent in older checkpoints (disjoint runs)
        self.auc_curve = state.get("auc_curve", [])
        self.class_acc = state.get("class_acc", [])
