"""Balancing rules for a replay loss: how the per-class replay weights ``w_c`` (or the scales of the new-data and
replay terms) are chosen. docs/methods.md, "Balancing rules", has the formulas; GSA's spec rule (``cumulative``)
is the default of GSA and is exactly `GradientStats` as before.

Class-weight rules keep gradient statistics G+ / G- per class (`GradientStats`' per-batch contribution,
:func:`batch_gradient_stats`) and give ``w_c = 2 sigmoid(G+_c / G-_c - 1)`` (`balance_weights`); they differ only
in which batches' statistics count:

- ``cumulative``: every batch of the stream, never reset (the spec);
- ``ema``: ``S <- m S + s_batch`` (m = 1 is ``cumulative``, bit for bit: the product by 1.0 is exact);
- ``task_reset``: the batches of the current task (zeroed when a new task's first batch arrives);
- ``window``: the last K batches (a [K, C] ring buffer per statistic on the device, summed on use);
- ``constant``: ``w_c = 1`` (the statistics are still accumulated as ``cumulative`` for the logged ratio).

``magnitude`` keeps ``w_c = 1`` and instead scales the new-data and the replay terms so that the norms of their
logit gradients keep a target ratio (:func:`logit_grad_norm`, :meth:`Magnitude.term_scales`).

Every rule has one interface: ``start(task)`` before a step's statistics (task-aware rules reset there),
``update(logits, targets, mask)`` with a replay batch, ``weights()`` / ``ratio()`` / ``positive`` /
``negative`` (the statistics that define the weights), ``grow``, ``state_dict`` / ``load_state_dict``. Nothing
here reads a value back to the host; the only host state is a task id and a batch counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import mask_logits
from .gsa import GradientStats, batch_gradient_stats

__all__ = [
    "RULES",
    "CLASS_WEIGHT_RULES",
    "make_rule",
    "logit_grad_norm",
    "Cumulative",
    "EMA",
    "TaskReset",
    "Window",
    "Constant",
    "Magnitude",
]


class Cumulative:
    """The spec: statistics summed over the whole stream (`GradientStats`, unchanged)."""

    name = "cumulative"
    adaptive = True  # the replay loss uses `weights()` (outside the method's warm-up)
    scales_terms = False  # `term_scales` re-weights the new-data and replay terms (magnitude only)

    def __init__(
        self,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.stats = GradientStats(num_classes, device=device, dtype=dtype)

    @property
    def positive(self) -> Tensor:
        return self.stats.positive

    @property
    def negative(self) -> Tensor:
        return self.stats.negative

    def start(self, task: int | None) -> None:
        """Called at the start of every step with the current task (before `update`; None: a blurry stream hides
        it)."""

    def update(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> None:
        self.stats.update(logits, targets, mask)

    def weights(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.stats.weights(dtype)

    def ratio(self) -> Tensor:
        return self.stats.ratio()

    def grow(self, n: int) -> None:
        self.stats.grow(n)

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()  # the checkpoint format of GSA before the rules existed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)


class EMA(Cumulative):
    """``S <- m * S + s_batch`` for S in (G+, G-): the statistics of about the last 1 / (1 - m) batches."""

    name = "ema"

    def __init__(
        self,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        momentum: float = 0.99,
    ) -> None:
        super().__init__(num_classes, device, dtype)
        self.momentum = float(momentum)

    def update(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> None:
        self.stats.positive.mul_(self.momentum)
        self.stats.negative.mul_(self.momentum)
        self.stats.update(logits, targets, mask)


class TaskReset(Cumulative):
    """Cumulative statistics restarted (zeroed) when a step of a new task arrives. The task of the last step is
    host state, saved with the statistics, so a resumed run does not reset mid-task."""

    name = "task_reset"

    def __init__(
        self,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(num_classes, device, dtype)
        self.task: int | None = -1  # None: the task of a step on a blurry stream (hidden)

    def start(self, task: int | None) -> None:
        if task != self.task:
            self.stats.positive.zero_()
            self.stats.negative.zero_()
            self.task = task

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task": self.task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.task = None if state["task"] is None else int(state["task"])  # None: saved on a blurry stream


class Window(Cumulative):
    """The sum of the last K batches' statistics: rows ``batches % K`` of two [K, C] ring buffers on the device
    hold each batch's contribution (overwritten after K batches); the statistics are the column sums. The batch
    counter is host state (no read-back)."""

    name = "window"

    def __init__(
        self,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        window: int = 100,
    ) -> None:
        super().__init__(num_classes, device, dtype)
        self.window = int(window)
        n = self.stats.num_classes
        self.ring_pos = torch.zeros(self.window, n, dtype=dtype, device=device)
        self.ring_neg = torch.zeros(self.window, n, dtype=dtype, device=device)
        self.batches = 0

    def grow(self, n: int) -> None:
        super().grow(n)
        pad = n - self.ring_pos.shape[1]
        if pad > 0:
            self.ring_pos = F.pad(self.ring_pos, (0, pad))
            self.ring_neg = F.pad(self.ring_neg, (0, pad))

    def update(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> None:
        c = logits.shape[1]
        if self.ring_pos.device != logits.device:
            self.ring_pos, self.ring_neg = self.ring_pos.to(logits.device), self.ring_neg.to(logits.device)
        self.grow(c)
        pos, neg = batch_gradient_stats(logits, targets, mask, None, self.stats.dtype)
        row = self.batches % self.window
        self.ring_pos[row].zero_()[:c] = pos
        self.ring_neg[row].zero_()[:c] = neg
        self.batches += 1
        # `stats` holds the window's sums, so `weights`, `ratio` and every reader of `stats` see the window
        self.stats.positive = self.ring_pos.sum(0)
        self.stats.negative = self.ring_neg.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "ring_pos": self.ring_pos.clone(),
            "ring_neg": self.ring_neg.clone(),
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device, dtype = self.stats.device, self.stats.dtype
        self.ring_pos = state["ring_pos"].to(device=device, dtype=dtype).clone()
        self.ring_neg = state["ring_neg"].to(device=device, dtype=dtype).clone()
        self.batches = int(state["batches"])


class Constant(Cumulative):
    """``w_c = 1``: the replay loss is plain cross-entropy. The cumulative statistics are still kept (their
    ratio is what `gsa/ratio` logs, the evidence of how imbalanced the gradients are), at the cost GSA's
    statistics always had."""

    name = "constant"
    adaptive = False

    def weights(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.ones(self.stats.num_classes, dtype=dtype, device=self.stats.device)


def logit_grad_norm(logits: Tensor, targets: Tensor, mask: Tensor, row_coef: Tensor | None = None) -> Tensor:
    """The Frobenius norm of ``d/dz [ mean_i c_i CE(mask_logits(z, mask)_i, y_i) ]`` in closed form, without a
    backward pass: the logit gradient of row i is ``c_i (p_i - e_{y_i}) / B`` (p the masked softmax; masked
    units get 0), and ``||p_i - e_{y_i}||^2 = sum_c p_ic^2 - 2 p_{i,y_i} + 1``. ``row_coef`` [B] (default 1):
    the per-row coefficient of the term (e.g. the class weight of its label). Detached, float32; an empty batch
    gives 0."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    p = torch.softmax(mask_logits(logits.detach().float(), mask), dim=1)
    p_y = p.gather(1, targets.reshape(-1, 1)).squeeze(1)
    sq = ((p * p).sum(1) - 2.0 * p_y + 1.0).clamp_min(0.0)
    if row_coef is not None:
        sq = sq * row_coef.detach().float() ** 2
    return sq.sum().sqrt() / logits.shape[0]


class Magnitude(Constant):
    """Class weights 1; the two loss terms are scaled (detached scales ``a``, ``b``) so that the logit-gradient
    norms keep ``|b g_replay| / |a g_new| = rho`` while their sum stays ``|g_new| + |g_replay|``:

        a = (|g_new| + |g_replay|) / ((1 + rho) |g_new|),   b = rho (|g_new| + |g_replay|) / ((1 + rho) |g_replay|),

    and ``a = b = 1`` where either norm is 0 (nothing to balance). Stateless beyond the logged cumulative
    statistics; the last scales are kept for logging."""

    name = "magnitude"
    scales_terms = True

    def __init__(
        self,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        ratio: float = 1.0,
    ) -> None:
        super().__init__(num_classes, device, dtype)
        self.target = float(ratio)
        self.last_scales: tuple[Tensor, Tensor] | None = None
        self.last_norms: tuple[Tensor, Tensor] | None = None

    def term_scales(self, norm_new: Tensor, norm_replay: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) from the two terms' logit-gradient norms (scalars; as they enter the loss unscaled)."""
        rho = self.target
        total = norm_new + norm_replay
        ok = (norm_new > 0) & (norm_replay > 0)
        one = torch.ones_like(total)
        a = torch.where(ok, total / ((1.0 + rho) * torch.where(ok, norm_new, one)), one)
        b = torch.where(ok, rho * total / ((1.0 + rho) * torch.where(ok, norm_replay, one)), one)
        self.last_scales, self.last_norms = (a, b), (norm_new, norm_replay)
        return a, b

    def log_values(self, prefix: str) -> dict[str, float]:
        if self.last_scales is None or self.last_norms is None:  # both are set together
            return {}
        (a, b), (gn, gr) = self.last_scales, self.last_norms
        return {
            f"{prefix}/new_scale": float(a),
            f"{prefix}/replay_scale": float(b),
            f"{prefix}/grad_norm_new": float(gn),
            f"{prefix}/grad_norm_replay": float(gr),
        }


RULES = {rule.name: rule for rule in (Cumulative, EMA, TaskReset, Window, Constant, Magnitude)}
CLASS_WEIGHT_RULES = ("cumulative", "ema", "task_reset", "window")


def make_rule(
    name: str,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    momentum: float = 0.99,
    window: int = 100,
    ratio: float = 1.0,
) -> Cumulative:
    """The rule `name` (one of RULES) with its knob; the names are checked by the methods' configs."""
    if name == "ema":
        return EMA(num_classes, device, dtype, momentum=momentum)
    if name == "window":
        return Window(num_classes, device, dtype, window=window)
    if name == "magnitude":
        return Magnitude(num_classes, device, dtype, ratio=ratio)
    if name not in RULES:
        raise ValueError(f"unknown balancing rule {name!r}; choose one of {sorted(RULES)}")
    return RULES[name](num_classes, device, dtype)


def class_log_values(rule: Cumulative, labels: Iterable[int], prefix: str = "gsa") -> dict[str, float]:
    """Host floats for the log (reads back: call at log intervals only): ``<prefix>/weight/<c>`` (the weight the
    rule gives class c) and ``<prefix>/ratio/<c>`` (G+_c / G-_c of its statistics; an infinite ratio is left
    out) for every label in ``labels``, plus magnitude's term scales (``balance/...``)."""
    weights, ratios = rule.weights().cpu(), rule.ratio().cpu()
    out: dict[str, float] = {}
    if rule.scales_terms:
        assert isinstance(rule, Magnitude)  # the one rule that scales the terms
        out = rule.log_values("balance")
    for c in sorted(labels):
        out[f"{prefix}/weight/{c}"] = float(weights[c])
        if torch.isfinite(ratios[c]):
            out[f"{prefix}/ratio/{c}"] = float(ratios[c])
    return out
