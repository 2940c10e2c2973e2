"""Experience replay (ER): plain cross-entropy over all seen classes, on whatever batch it is given
(the method concatenates the incoming batch and the replay batch)."""

from __future__ import annotations

from torch import Tensor

from .common import cross_entropy_masked

__all__ = ["er_loss"]


def er_loss(logits: Tensor, targets: Tensor, seen: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` [B, C] against ``targets`` [B], softmax over the seen classes
    (``seen``: bool [C]) only; unseen head units get exactly zero gradient."""
    return cross_entropy_masked(logits, targets, seen)
