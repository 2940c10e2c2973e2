"""DER++ (Buzzega et al., NeurIPS 2020): cross-entropy on the incoming batch, a mean squared error between the
current logits of replayed rows and the logits stored with them, and a cross-entropy on a second replay draw.

    L = CE(z_new, y_new) + alpha * mean_{i,k} (z_i,k - s_i,k)^2 + beta * CE(z_rep, y_rep)

The MSE runs over every head unit as stored (not-yet-seen classes included), averaged over rows and units, as
the official code's ``F.mse_loss`` does. Both cross-entropies use the softmax over ``mask`` (the caller passes
the seen classes, or an all-True mask for the official whole-head softmax).
"""

from __future__ import annotations

from torch import Tensor

from .common import cross_entropy_masked, zero_loss

__all__ = ["logit_mse", "derpp_loss"]


def logit_mse(logits: Tensor, stored: Tensor) -> Tensor:
    """Mean over rows and head units of (logits - stored)^2; a graph-attached 0 for an empty batch."""
    if logits.shape[0] == 0:
        return zero_loss(logits)
    return (logits - stored).pow(2).mean()


def derpp_loss(
    logits_new: Tensor,
    y_new: Tensor,
    logits_mse: Tensor,
    stored_logits: Tensor,
    logits_ce: Tensor,
    y_ce: Tensor,
    mask: Tensor,
    alpha: float,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (total, CE on the incoming rows, MSE on the first replay draw, CE on the second replay draw).
    Empty replay draws (a host-known shape) contribute a graph-attached 0."""
    ce_new = cross_entropy_masked(logits_new, y_new, mask)
    mse = logit_mse(logits_mse, stored_logits)
    ce_rep = cross_entropy_masked(logits_ce, y_ce, mask)
    return ce_new + alpha * mse + beta * ce_rep, ce_new, mse, ce_rep
