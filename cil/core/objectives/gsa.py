"""GSA: the gradient-balanced objective of Guo, Liu, Zhao, "Dealing with Cross-Task Class Discrimination in
Online Continual Learning", CVPR 2023, exactly as restated in the project spec ``docs/gsa.md``
("the spec"; "step n" below refers to its numbered steps of one online step).

This module holds only the pure pieces: the accumulated gradient statistics (steps 5-6), the new-data loss
(step 2) and the weighted replay loss (step 7). Which samples go where (steps 1, 3), the warm-up (step 6),
the total ``L = 2 * L_buf + L_new`` (step 8) and the buffer (step 9) belong to the method.

Statistics are keyed by the class label itself (index = label, the column of the class in the head), never by
the position of a class in a list of seen classes, so any class order works (spec, "Known defects").
Nothing here synchronises host and device; it is usable without our loop (the Avalanche plugin uses it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import cross_entropy_masked, mask_logits, zero_loss

__all__ = ["GradientStats", "batch_gradient_stats", "gsa_new_loss", "gsa_replay_loss", "balance_weights"]


def balance_weights(positive: Tensor, negative: Tensor) -> Tensor:
    """Step 6: ``w_c = 2 * sigmoid(G+_c / G-_c - 1)``, with the guard for ``G-_c == 0`` (the official code has
    no epsilon): ``w_c = 2`` where ``G+_c > 0`` (the limit of the formula as ``G- -> 0``), and ``w_c = 1`` where
    both are 0 (no evidence: neutral weight). Built with ``torch.where`` only, so no sync and never NaN/inf."""
    has_neg = negative > 0
    safe_neg = torch.where(has_neg, negative, torch.ones_like(negative))
    w = 2.0 * torch.sigmoid(positive / safe_neg - 1.0)
    two = torch.full_like(positive, 2.0)
    one = torch.ones_like(positive)
    return torch.where(has_neg, w, torch.where(positive > 0, two, one))


@torch.no_grad()
def batch_gradient_stats(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    row_weights: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """One batch's contribution to G+ and G- ([C] each, in ``dtype``): see :meth:`GradientStats.update`."""
    z = logits.detach().to(dtype)
    if mask is not None:
        z = mask_logits(z, mask)
    p = torch.softmax(z, dim=1)
    # a comparison, not scatter_: the same 0 / 1 values, and it runs under vmap (packed runs) without a fallback
    onehot = (targets.reshape(-1, 1) == torch.arange(p.shape[1], device=p.device)).to(dtype)
    pos = (1.0 - p) * onehot
    if mask is not None:
        pos = pos * mask.to(dtype)
    neg = p * (1.0 - onehot)
    if row_weights is not None:
        rw = row_weights.detach().to(dtype).reshape(-1, 1)
        pos, neg = pos * rw, neg * rw
    return pos.sum(0), neg.sum(0)


class GradientStats:
    """Per-class accumulated magnitudes of the softmax-cross-entropy logit gradient (spec steps 5-6).

    For a row with label y and softmax p, ``dCE/dz_c = p_c - 1[c = y]``: the row gives its own class a
    *positive* gradient of magnitude ``1 - p_y`` and every other class c a *negative* one of magnitude ``p_c``.

    ``positive[c]`` (G+) and ``negative[c]`` (G-) are indexed by the label c. They start at 0, grow with the
    head (to ``logits.shape[1]`` on update, a host-known shape, so growing never syncs; or sized to
    ``num_classes`` at construction), and are never reset.

    Accumulators are float64 by default: the sums run over the whole stream (hundreds of thousands of rows,
    e.g. TinyImageNet with two views), and in float32 each addition to a large running sum rounds away
    ~1e-7 of it, so a long stream drifts, whereas float64 keeps the ratio G+/G- exact to ~1e-12 at a cost of a
    few hundred numbers per step. Pass ``dtype=torch.float32`` for devices without float64 (e.g. MPS).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        n = int(num_classes or 0)
        self.dtype = dtype
        self.positive = torch.zeros(n, dtype=dtype, device=device)
        self.negative = torch.zeros(n, dtype=dtype, device=device)

    @property
    def num_classes(self) -> int:
        return self.positive.shape[0]

    @property
    def device(self) -> torch.device:
        return self.positive.device

    def to(self, device: torch.device | str) -> GradientStats:
        self.positive = self.positive.to(device)
        self.negative = self.negative.to(device)
        return self

    def grow(self, n: int) -> None:
        """Grow to at least ``n`` classes (new classes start at zero)."""
        if n > self.num_classes:
            pad = (0, n - self.num_classes)
            self.positive = F.pad(self.positive, pad)
            self.negative = F.pad(self.negative, pad)

    @torch.no_grad()
    def update(
        self, logits: Tensor, targets: Tensor, mask: Tensor | None = None, row_weights: Tensor | None = None
    ) -> None:
        """Step 5: accumulate the statistics of one batch.

        ``logits`` [B, C] (detached here; any float dtype), ``targets`` [B] labels in [0, C),
        ``mask`` bool [C]: the classes of the softmax (step 4: all seen classes); None = all C head units.
        ``p = softmax(mask_logits(logits, mask))`` on detached float64 values, then for every class c:
        ``G+_c += sum_{i: y_i = c} (1 - p_ic)`` and ``G-_c += sum_{i: y_i != c} p_ic``. Classes outside the
        mask get nothing (p = 0, and a target outside the mask, which would be a caller error, adds no G+).
        Every row counts (the spec: both views, current-task rows included).
        ``row_weights`` [B] (optional, not used by GSA itself): multiply row i's contributions by
        ``row_weights[i]``, e.g. a loss's per-row coefficient to get the magnitudes of that loss's own logit
        gradient (cil.core.diagnostics uses it); None = every row counts 1, as in the spec.
        """
        n = logits.shape[1]
        if self.positive.device != logits.device:
            self.to(logits.device)
        self.grow(n)
        pos, neg = batch_gradient_stats(logits, targets, mask, row_weights, self.dtype)
        self.positive[:n] += pos
        self.negative[:n] += neg

    def ratio(self) -> Tensor:
        """``r_c = G+_c / G-_c`` (step 6), with the guard: ``+inf`` where G- = 0 < G+, 1 where both are 0."""
        has_neg = self.negative > 0
        safe_neg = torch.where(has_neg, self.negative, torch.ones_like(self.negative))
        r = self.positive / safe_neg
        inf = torch.full_like(r, float("inf"))
        return torch.where(has_neg, r, torch.where(self.positive > 0, inf, torch.ones_like(r)))

    def weights(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Step 6: ``w_c = 2 * sigmoid(G+_c / G-_c - 1)`` in (0, 2], indexed by label, guarded as in
        :func:`balance_weights`; a constant (no gradient). Call after :meth:`update` on the current batch
        (the spec uses the statistics *after* adding it). The warm-up (w = 1 for the first 5 batches of a
        task) is the method's business: it uses ``torch.ones`` instead of calling this."""
        return balance_weights(self.positive, self.negative).to(dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"positive": self.positive.clone(), "negative": self.negative.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.device
        self.positive = state["positive"].detach().to(device=device, dtype=self.dtype).clone()
        self.negative = state["negative"].detach().to(device=device, dtype=self.dtype).clone()

    def __repr__(self) -> str:
        return f"GradientStats(num_classes={self.num_classes}, device={self.device}, dtype={self.dtype})"


def gsa_new_loss(logits: Tensor, targets: Tensor, task_mask: Tensor) -> Tensor:
    """Step 2: ``L_new``, mean cross-entropy over the current task's classes only.

    ``logits`` [B, C], ``targets`` [B] (labels of the current task), ``task_mask`` bool [C] (the task's
    classes, C_t). Masking the other logits to -inf is equivalent to the spec's "logits restricted to C_t,
    labels remapped into C_t"; the gradient on every logit outside the task is exactly 0, so new data never
    pushes old-class logits down."""
    return cross_entropy_masked(logits, targets, task_mask)


def gsa_replay_loss(logits: Tensor, targets: Tensor, weights: Tensor, seen: Tensor) -> Tensor:
    """Step 7: ``L_buf = mean_i( -w_{y_i} * log_softmax(masked logits)_{i, y_i} )``.

    ``logits`` [B, C], ``targets`` [B], ``weights`` [K] per-label weights (from
    :meth:`GradientStats.weights`; detached here, they are constants; if K < C the missing classes get
    weight 1, the no-evidence value), ``seen`` bool [C] (the softmax runs over all seen classes, step 4).
    Only the target term is weighted. Log-softmax is applied once (not softmax twice, the defect of one port).
    An empty batch gives a graph-attached 0."""
    if logits.shape[0] == 0:
        return zero_loss(logits)
    c = logits.shape[1]
    w = weights.detach()
    if w.shape[0] < c:
        w = F.pad(w, (0, c - w.shape[0]), value=1.0)
    logp = torch.log_softmax(mask_logits(logits, seen), dim=1)
    logp_y = logp.gather(1, targets.reshape(-1, 1)).squeeze(1)
    w_y = w.to(logp.dtype).gather(0, targets.reshape(-1))
    return -(w_y * logp_y).mean()
