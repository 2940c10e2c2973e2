"""Gradient-imbalance diagnostics for any method: the bias that GSA corrects, measured in any run.

Turned on with ``diagnostics.enabled=true``; the definitions below are also in README ("Diagnostics").

**Loss terms.** Each method reports every cross-entropy term of its loss through ``Method.report`` as
(source, logits, targets, mask, scale, class_weights), meaning the term

    scale * mean_i( w[y_i] * CE_i ),   CE_i = cross-entropy of row i with the softmax over ``mask``,

and the reported terms add up to the method's loss (the tests check this for every method):
- naive: 'new' = incoming rows, softmax over the seen classes;
- ER: one CE over incoming + replay rows, seen classes: 'new' = incoming rows with scale n/(n+m),
  'replay' = replay rows with scale m/(n+m);
- ER-ACE: 'new' = incoming rows, softmax over the classes present in the incoming batch; 'replay' = replay
  rows, seen classes;
- GSA: 'new' = the new-data branch (incoming + current-task buffer rows, every view), softmax over the task's
  classes; 'replay' = the mixed replay batch (every view), seen classes, weights w, scale buffer_loss_weight.

**1. Logit-gradient masses per class** (every update; queued, and folded into the statistics at each snapshot,
so no sync per step). For row i with softmax p over its term's mask, dCE_i/dz_ic = p_ic - 1[c = y_i]: its own
class gets a *positive* gradient 1 - p_iy, every other class of the mask a *negative* one p_ic, classes outside
the mask nothing. Two accountings, per source, each a ``cil.core.objectives.gsa.GradientStats`` accumulated over the
whole stream:
- ``mass``: every row counts 1: GSA's own statistics (for GSA, the 'replay' mass equals ``method.stats``);
- ``effective``: row i weighted by its coefficient in the loss (scale * w[y_i] / N): exactly the positive and
  negative parts of dLoss/dlogits, the logit gradient the optimiser follows.
Ratio r_c = G+_c / G-_c (< 1: class c is pushed down more than up). At task t, *old* classes are those of tasks
< t and *new* those of task t; a group's ratio is sum G+ / sum G- over its classes.

**2. Per-source parameter gradients** (every ``every`` batches, first update of the batch). The loss splits
into groups of rows (source, task of the row's label), each the sum of its rows' share of the loss. Before the
method's backward, ``torch.autograd.grad(group, parameters, retain_graph=True)`` gives each group's gradient
with respect to *all* trainable parameters (affordable: one backward per group, on measured batches only), and
the head's slice of it (the head is where the imbalance acts, the body where interference between tasks
shows). Source gradient = sum of its groups, task gradient = sum of the task's groups over both sources; norms
and the cosine of new vs replay. The groups add up to the loss,
so their gradients add up to the one the optimiser uses. Nothing here writes ``.grad``, runs a forward or
draws a random number, so the optimiser step is the same with diagnostics on or off.

**3. Learning gain per task.** At every task end (full test sets): gain_j = accuracy of task j now minus at the
previous task end (0 before its classes were seen), against the mean norm of task j's gradient over the
measured steps in between (0 on steps without rows of task j).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cil.core.data.stream import Batch, ClassIncrementalStream
from cil.core.metrics import ScalarLog
from cil.core.objectives.common import classes_mask, mask_logits
from cil.core.objectives.gsa import GradientStats

SOURCES = ("new", "replay")
KINDS = ("mass", "effective")


@dataclass
class LossTerm:
    """One reported term: its per-row losses sum to the term's contribution to the method's loss."""

    source: str
    logits: Tensor  # [N, C], attached to the graph
    targets: Tensor  # [N]
    mask: Tensor  # bool [C]: the classes of the term's softmax
    coef: Tensor  # [N]: row i's coefficient in the loss, scale * w[y_i] / N

    def row_losses(self) -> Tensor:
        ce = F.cross_entropy(mask_logits(self.logits, self.mask), self.targets, reduction="none")
        return ce * self.coef


def row_coefficients(targets: Tensor, num_classes: int, scale: float, class_weights: Tensor | None) -> Tensor:
    """scale * w[y_i] / N for a mean-reduced term of N rows (w = 1 without class weights; classes beyond a short
    weight vector get 1, as in gsa_replay_loss)."""
    coef = torch.full(targets.shape, scale / targets.shape[0], device=targets.device)
    if class_weights is not None:
        w = class_weights.detach().float().to(targets.device)
        if w.shape[0] < num_classes:
            w = F.pad(w, (0, num_classes - w.shape[0]), value=1.0)
        coef = coef * w.gather(0, targets)
    return coef


def ratio(pos: float, neg: float) -> float:
    """G+ / G- with GradientStats' guard: inf where only G+ > 0, 1 where both are 0."""
    return pos / neg if neg > 0 else (math.inf if pos > 0 else 1.0)


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _model_parameters(model: nn.Module) -> tuple[list[nn.Parameter], int]:
    """Trainable parameters with the head's last, and the head's size (its slice is the tail of a flat grad)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the model
    head = [p for p in getattr(inner, "head", nn.Module()).parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return body + head, sum(p.numel() for p in head)


class Diagnostics:
    """Accounts logit gradients (every update) and measures parameter gradients (every ``every`` batches).

    The learner calls ``begin_batch`` / ``end_batch`` around each ``method.observe`` and ``on_evaluation`` at each
    task end; the method calls ``report`` for each loss term and ``before_backward`` in its ``step``."""

    def __init__(self, every: int, class_task: Sequence[int], model: nn.Module, device: torch.device | str) -> None:
        self.every = int(every)
        self.class_task = [int(t) for t in class_task]  # label -> task index
        self.num_classes = len(self.class_task)
        self.n_tasks = max(self.class_task) + 1
        self.device = torch.device(device)
        self._class_task = torch.tensor(self.class_task, device=self.device).clamp(min=0)  # rows only of stream classes
        self.stats = {(k, s): GradientStats(self.num_classes, device=self.device) for k in KINDS for s in SOURCES}
        self.params, self.head_size = _model_parameters(model)
        self.step, self.task = 0, -1
        self.measuring = False
        self.terms: list[LossTerm] = []
        # Host-side records (what the logs, results.json and the plots are made of).
        # cumulative per-class G+/G- per kind and source, every `every` batches
        self.snapshots: list[dict[str, Any]] = []
        self.grads: list[dict[str, Any]] = []  # per measured step: gradient norms per source and task, cosines
        self.gains: list[dict[str, Any]] = []  # per task end and task: accuracy change against gradient norm
        self._pending_grad: dict[str, Any] | None = None
        # reported terms not yet in the statistics (see flush): (source, logits, targets, mask, scale, class weights)
        self._queue: list[tuple[str, Tensor, Tensor, Tensor | str, float, Tensor | None]] = []
        self.last_grads: dict[str, Tensor] = {}
        self._interval: dict[int, list[float]] = {}  # task -> [sum of norms, sum of head norms] since last eval
        self._interval_steps = 0
        self._prev_acc = [0.0] * self.n_tasks

    @classmethod
    def for_stream(cls, every: int, stream: ClassIncrementalStream, model: nn.Module) -> Diagnostics:
        return cls(every, stream.class_task, model, stream.device)

    # -- hooks -----------------------------------------------------------------------------------------------
    def begin_batch(self, batch: Batch) -> None:
        assert batch.task is not None  # the learner hands over the stream's batch, which carries its task
        self.step, self.task = batch.step + 1, batch.task  # `step` counts batches observed, as the learner does
        self.measuring = self.step % self.every == 0
        self.terms = []

    def report(
        self,
        source: str,
        logits: Tensor,
        targets: Tensor,
        mask: Tensor | str,
        scale: float = 1.0,
        class_weights: Tensor | None = None,
    ) -> None:
        """One loss term: ``scale * mean_i(w[y_i] * CE(mask_logits(logits, mask)_i, y_i))``. ``mask`` is a bool
        [C] tensor or "present" (the classes present in ``targets``, ER-ACE's incoming mask)."""
        if source not in SOURCES:
            raise ValueError(f"diagnostics: source={source!r} is not one of {SOURCES}")
        if logits.shape[0] == 0:
            return
        if isinstance(mask, str) and mask != "present":
            raise ValueError(f"diagnostics: mask={mask!r}: pass a bool tensor or 'present'")
        # Queued and folded into the statistics many steps at a time (`flush`): a step costs list appends and a
        # copy of the mask and weights (methods update those in place), not a dozen small ops per statistic.
        weights = None if class_weights is None else class_weights.detach().clone()
        self._queue.append(
            (source, logits.detach(), targets, mask if isinstance(mask, str) else mask.clone(), float(scale), weights)
        )
        if self.measuring:
            if isinstance(mask, str):
                mask = classes_mask(targets, logits.shape[1])
            coef = row_coefficients(targets, logits.shape[1], scale, class_weights)
            self.terms.append(LossTerm(source, logits, targets, mask, coef))

    def flush(self) -> None:
        """Fold the queued terms into the statistics; called before anything reads them. The same sums as
        per-step updates, up to float64 rounding."""
        queue, self._queue = self._queue, []
        for source in SOURCES:
            items = [q for q in queue if q[0] == source]
            if not items:
                continue
            c = items[0][1].shape[1]
            logits = torch.cat([q[1].to(torch.float64) for q in items])
            targets = torch.cat([q[2] for q in items])
            masks = torch.cat(
                [(classes_mask(q[2], c) if isinstance(q[3], str) else q[3]).expand(len(q[2]), c) for q in items]
            )
            coef = torch.cat([row_coefficients(q[2], c, q[4], q[5]) for q in items])
            self.stats["mass", source].update(logits, targets, masks)
            self.stats["effective", source].update(logits, targets, masks, row_weights=coef)

    def before_backward(self, loss: Tensor) -> None:
        """Called by ``Method.step`` just before ``loss.backward()``; measures on the first update of a
        measured batch."""
        if self.measuring and self.terms:
            self._pending_grad = self._measure()
        self.measuring = False
        self.terms = []

    def end_batch(self, logger: ScalarLog) -> None:
        if self._pending_grad is not None:
            self._log_grad(self._pending_grad, logger)
            self._pending_grad = None
        if self.step % self.every == 0:
            self._snapshot(logger)
        elif len(self._queue) >= 512:  # bound the queue when snapshots are rare
            self.flush()

    def on_evaluation(self, task: int, acc_row: Sequence[float], logger: ScalarLog) -> None:
        """At a task end: snapshot the statistics and record each seen task's gain since the previous one."""
        if not self.snapshots or self.snapshots[-1]["step"] != self.step:
            self._snapshot(logger)
        n = max(self._interval_steps, 1)
        for j in range(task + 1):
            norm, head = self._interval.get(j, [0.0, 0.0])
            gain = float(acc_row[j]) - self._prev_acc[j]
            rec = {
                "step": self.step,
                "after_task": task,
                "task": j,
                "gain": gain,
                "grad_norm": norm / n if self._interval_steps else None,
                "head_grad_norm": head / n if self._interval_steps else None,
                "measured_steps": self._interval_steps,
            }
            self.gains.append(rec)
            logger.scalar(f"diag/gain/task_{j}", gain, self.step, task)
            if rec["grad_norm"] is not None:
                logger.scalar(f"diag/interval_grad_norm/task_{j}", rec["grad_norm"], self.step, task)
            self._prev_acc[j] = float(acc_row[j])
        self._interval, self._interval_steps = {}, 0

    # -- parameter gradients ---------------------------------------------------------------------------------
    def _flat_grad(self, loss: Tensor) -> Tensor:
        if not loss.requires_grad:
            return torch.zeros(sum(p.numel() for p in self.params), device=self.device)
        grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params, strict=True)]
        )

    def _norms(self, g: Tensor) -> tuple[float, float]:
        return float(g.norm()), float(g[g.shape[0] - self.head_size :].norm())

    def _measure(self) -> dict[str, Any]:
        """Gradients of the (source, task) groups of rows; one backward each, the graph kept for the method.
        Accumulators are the first group's gradient itself (no zero-filled vectors), and the total's norm and
        the cosines come from dot products, so the bookkeeping stays small next to the backward passes."""
        groups: dict[int, list[tuple[str, Tensor]]] = {}
        for term in self.terms:
            rows = term.row_losses()
            row_task = self._class_task[term.targets]
            for j in torch.unique(row_task).tolist():  # a sync, on measured steps only
                groups.setdefault(j, []).append((term.source, (rows * (row_task == j)).sum()))
        size = sum(p.numel() for p in self.params)
        total: dict[str, Tensor] = {}
        rec: dict[str, Any] = {"step": self.step, "task": self.task, "tasks": {}, "replay_tasks": {}}
        for j in sorted(groups):  # one task at a time: at most one task-sized accumulator alive
            task_grad: Tensor | None = None
            for source, group_loss in groups[j]:
                g = self._flat_grad(group_loss)
                total[source] = g.clone() if source not in total else total[source].add_(g)
                task_grad = g if task_grad is None else task_grad + g
                if source == "replay":
                    rec["replay_tasks"][j] = self._norms(g)
            assert task_grad is not None  # every group list has a term
            one_replay_group = len(groups[j]) == 1 and groups[j][0][0] == "replay"
            rec["tasks"][j] = rec["replay_tasks"][j] if one_replay_group else self._norms(task_grad)
        for s in SOURCES:
            total.setdefault(s, torch.zeros(size, device=self.device))
        self.last_grads = total  # the flat per-source gradients of the last measured step (tests, notebooks)
        h = size - self.head_size
        a, b = total["new"], total["replay"]
        for key, (x, y) in (("", (a, b)), ("head_", (a[h:], b[h:]))):
            xx, yy, xy = float(x @ x), float(y @ y), float(x @ y)
            rec[f"{key}cos"] = xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else None
            rec[f"_{key}sq"] = (xx, yy, math.sqrt(max(xx + yy + 2 * xy, 0.0)))
        for i, s in enumerate(SOURCES):
            rec[s] = (math.sqrt(rec["_sq"][i]), math.sqrt(rec["_head_sq"][i]))
        rec["total"] = (rec.pop("_sq")[2], rec.pop("_head_sq")[2])
        return rec

    def _log_grad(self, rec: dict[str, Any], logger: ScalarLog) -> None:
        step, task = rec["step"], rec["task"]
        for s in (*SOURCES, "total"):
            logger.scalar(f"diag/grad_norm/{s}", rec[s][0], step, task)
            logger.scalar(f"diag/head_grad_norm/{s}", rec[s][1], step, task)
        for key in ("cos", "head_cos"):
            if rec[key] is not None:
                logger.scalar(f"diag/grad_{key}", rec[key], step, task)
        for j, (norm, _head) in rec["tasks"].items():
            logger.scalar(f"diag/grad_norm/task_{j}", norm, step, task)
        for j, (norm, _head) in rec["replay_tasks"].items():
            logger.scalar(f"diag/grad_norm/replay_task_{j}", norm, step, task)
        self.grads.append(rec)
        for j, (norm, head) in rec["tasks"].items():
            acc = self._interval.setdefault(j, [0.0, 0.0])
            acc[0] += norm
            acc[1] += head
        self._interval_steps += 1

    # -- logit-gradient statistics ---------------------------------------------------------------------------
    def _host_stats(self) -> dict[str, dict[str, list[float]]]:
        self.flush()
        return {
            f"{k}/{s}": {"pos": st.positive.cpu().tolist(), "neg": st.negative.cpu().tolist()}
            for (k, s), st in self.stats.items()
        }

    def _groups(self, task: int) -> dict[str, list[int]]:
        return {
            "old": [c for c, t in enumerate(self.class_task) if 0 <= t < task],
            "new": [c for c, t in enumerate(self.class_task) if t == task],
        }

    def _snapshot(self, logger: ScalarLog) -> None:
        snap: dict[str, Any] = {"step": self.step, "task": self.task, "stats": self._host_stats()}
        prev = self.snapshots[-1]["stats"] if self.snapshots else None
        self.snapshots.append(snap)
        step, task = self.step, self.task
        pos, neg = _combined(snap["stats"], "mass")
        for c, t in enumerate(self.class_task):
            if 0 <= t <= task and pos[c] + neg[c] > 0:
                logger.scalar(f"diag/ratio/class_{c}", ratio(pos[c], neg[c]), step, task)
        for kind in KINDS:
            for src in (*SOURCES, "all"):
                now = _combined(snap["stats"], kind, src)
                before = _combined(prev, kind, src) if prev else ([0.0] * self.num_classes,) * 2
                for name, classes in self._groups(task).items():
                    if not classes:
                        continue
                    p, n = sum(now[0][c] for c in classes), sum(now[1][c] for c in classes)
                    dp = p - sum(before[0][c] for c in classes)
                    dn = n - sum(before[1][c] for c in classes)
                    for key, value in ((f"ratio_{name}", ratio(p, n)), (f"recent_ratio_{name}", ratio(dp, dn))):
                        if math.isfinite(value) and (p + n > 0):
                            logger.scalar(f"diag/{kind}/{src}/{key}", value, step, task)

    # -- results ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """For results.json: final per-class statistics, per-task (old vs new) statistics of each task's
        interval, mean gradient norms per task interval, and the gains."""
        final = self._host_stats()
        classes = []
        for c, t in enumerate(self.class_task):
            row: dict[str, Any] = {"class": c, "task": t}
            for kind in KINDS:
                for src in (*SOURCES, "all"):
                    p, n = _combined(final, kind, src)
                    row[f"{kind}/{src}"] = {"pos": p[c], "neg": n[c], "ratio": _json_float(ratio(p[c], n[c]))}
            classes.append(row)
        per_task = []
        ends = [
            s
            for i, s in enumerate(self.snapshots)
            if i + 1 == len(self.snapshots) or self.snapshots[i + 1]["task"] != s["task"]
        ]
        prev = None
        for snap in ends:
            t = snap["task"]
            entry: dict[str, Any] = {"task": t, "step": snap["step"]}
            for kind in KINDS:
                for src in (*SOURCES, "all"):
                    now = _combined(snap["stats"], kind, src)
                    before = _combined(prev["stats"], kind, src) if prev else ([0.0] * self.num_classes,) * 2
                    for name, cls in self._groups(t).items():
                        if not cls:
                            continue
                        dp = sum(now[0][c] - before[0][c] for c in cls)
                        dn = sum(now[1][c] - before[1][c] for c in cls)
                        entry[f"{kind}/{src}/{name}"] = {"pos": dp, "neg": dn, "ratio": _json_float(ratio(dp, dn))}
            recs = [g for g in self.grads if g["task"] == t]
            if recs:
                for s in (*SOURCES, "total"):
                    entry[f"grad_norm/{s}"] = sum(g[s][0] for g in recs) / len(recs)
                    entry[f"head_grad_norm/{s}"] = sum(g[s][1] for g in recs) / len(recs)
                cos = [g["cos"] for g in recs if g["cos"] is not None]
                entry["grad_cos"] = sum(cos) / len(cos) if cos else None
            per_task.append(entry)
            prev = snap
        return {
            "every": self.every,
            "classes": classes,
            "per_task": per_task,
            "gains": self.gains,
            "measured_steps": len(self.grads),
        }

    def series(self) -> dict[str, Any]:
        """Everything recorded over time (diagnostics.json): the snapshots, gradient records and gains."""
        grads = [
            {
                **g,
                "tasks": {str(k): v for k, v in g["tasks"].items()},
                "replay_tasks": {str(k): v for k, v in g["replay_tasks"].items()},
            }
            for g in self.grads
        ]
        return {
            "every": self.every,
            "class_task": self.class_task,
            "snapshots": self.snapshots,
            "grads": grads,
            "gains": self.gains,
        }

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {
            "stats": {f"{k}/{s}": st.state_dict() for (k, s), st in self.stats.items()},
            "snapshots": self.snapshots,
            "grads": self.grads,
            "gains": self.gains,
            "interval": self._interval,
            "interval_steps": self._interval_steps,
            "prev_acc": self._prev_acc,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for (k, s), st in self.stats.items():
            st.load_state_dict(state["stats"][f"{k}/{s}"])
        self.snapshots, self.grads, self.gains = state["snapshots"], state["grads"], state["gains"]
        self._interval, self._interval_steps = state["interval"], state["interval_steps"]
        self._prev_acc = state["prev_acc"]


def _combined(stats: dict[str, dict[str, list[float]]], kind: str, src: str = "all") -> tuple[list[float], list[float]]:
    """(G+, G-) per class of one kind, for one source or summed over both ('all')."""
    srcs = SOURCES if src == "all" else (src,)
    pos = [sum(v) for v in zip(*(stats[f"{kind}/{s}"]["pos"] for s in srcs), strict=True)]
    neg = [sum(v) for v in zip(*(stats[f"{kind}/{s}"]["neg"] for s in srcs), strict=True)]
    return pos, neg
