"""Shared pieces of the objectives: class masks over the head and masked cross-entropy.

Conventions (all objectives):
- The head covers every class of the benchmark; a label is the column index of its class in the logits.
- A set of classes is a bool mask over the head, ``mask: Tensor[bool] [num_classes]``, on the logits' device.
- Classes outside a mask are removed from the softmax by setting their logits to ``-inf``. Their softmax
  probability is then exactly 0 and the gradient on their logits is exactly 0 (``masked_fill`` passes no
  gradient to the filled entries).
- Nothing here synchronises host and device: no ``.item()``, no branching on tensor values, no boolean-mask
  indexing. Only shapes (known on the host) are inspected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mask_logits", "classes_mask", "cross_entropy_masked", "zero_loss"]


def mask_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Return ``logits`` with the columns outside ``mask`` set to ``-inf``.

    ``logits``: [B, C]; ``mask``: bool [C] (broadcast over rows) or bool [B, C].
    A row whose mask is all False gives NaN after softmax; callers always keep the target classes inside.
    """
    return logits.masked_fill(~mask, float("-inf"))


def classes_mask(labels: Tensor, num_classes: int) -> Tensor:
    """Bool mask [num_classes] of the classes present in ``labels`` (a 1-D long tensor), built on
    ``labels.device`` with ``index_fill`` (no host/device synchronisation; out of place, so that it also runs
    under vmap, for packed runs). Labels must lie in [0, num_classes); an empty ``labels`` gives an all-False
    mask."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    return mask.index_fill(0, labels.reshape(-1), True)


def zero_loss(logits: Tensor) -> Tensor:
    """A scalar 0 that stays attached to the graph of ``logits`` (for empty batches)."""
    return logits.sum() * 0.0


def cross_entropy_masked(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` [B, C] against ``targets`` [B] with the softmax restricted to the
    classes in ``mask`` (bool [C]). Equivalent to slicing the logits to the masked columns and remapping the
    labels into that slice. Every target must be inside the mask (else the loss is +inf).
    An empty batch (B = 0, a host-known shape) gives a graph-attached 0 instead of NaN."""
    if logits.shape[0] == 0:
        return zero_loss(logits)
    return F.cross_entropy(mask_logits(logits, mask), targets)
