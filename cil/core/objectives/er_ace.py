"""ER-ACE: experience replay with asymmetric cross-entropy.

Caccia, Aljundi, Asadi, Tuytelaars, Pineau, Belilovsky, "New Insights on Reducing Abrupt Representation
Change in Online Continual Learning", ICLR 2022 (official code: pclucas14/AML, methods/er_ace.py + er.py).

- Incoming batch: cross-entropy with the softmax restricted to the classes *present in the incoming batch*,
  so new samples never push the logits of other (old) classes down.
- Replay batch: cross-entropy over all seen classes.
- Total: ``mean(incoming) + mean(replay)``. This is the reduction of the official code: ``ER.observe``
  calls ``self.update(inc_loss + re_loss)`` with two mean-reduced ``nn.CrossEntropyLoss`` values.

Two deliberate differences from the official code, following this project's conventions:
the official incoming-batch mask also leaves the not-yet-seen head units (``seen_so_far.max():``) in the
softmax and the official replay loss uses every head unit; here the incoming term uses exactly the present
classes and the replay term exactly the seen classes (unseen units get zero gradient everywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import classes_mask, cross_entropy_masked

__all__ = ["er_ace_loss", "er_ace_loss_joint"]


def er_ace_loss(
    logits_new: Tensor, y_new: Tensor, logits_buf: Tensor | None, y_buf: Tensor | None, seen: Tensor
) -> Tensor:
    """ER-ACE loss.

    ``logits_new`` [B, C], ``y_new`` [B]: the incoming batch, softmax over the classes present in ``y_new``.
    ``logits_buf`` [R, C], ``y_buf`` [R]: the replay batch, softmax over ``seen`` (bool [C]).
    An empty (R = 0) or missing replay batch gives just the incoming term.
    """
    present = classes_mask(y_new, logits_new.shape[1])
    loss = cross_entropy_masked(logits_new, y_new, present)
    if logits_buf is None or logits_buf.shape[0] == 0:
        return loss
    assert y_buf is not None  # the replay batch comes with its labels
    return loss + cross_entropy_masked(logits_buf, y_buf, seen)


def er_ace_loss_joint(logits: Tensor, y_new: Tensor, y_buf: Tensor, unseen: Tensor) -> Tensor:
    """The same loss, bit for bit, from the logits of one forward pass over [incoming; replay] rows ([B + R, C],
    R >= 1), with fewer operations: one masked fill with a per-row mask (incoming rows: every class but the
    present ones; replay rows: ``unseen``, the complement of the seen mask, which a caller can keep between
    steps) and one log-softmax over all rows, then the two mean NLL terms on row slices of the log-probabilities.
    Log-softmax works row by row and the NLL means reduce the same rows as two separate cross-entropies, so the
    loss and the gradients equal `er_ace_loss` on ``logits[:B]``, ``logits[B:]`` exactly."""
    n, c = len(y_new), logits.shape[1]
    # built out of place, so that it also runs under vmap (packed runs)
    blocked_new = torch.ones(n, c, dtype=torch.bool, device=logits.device).index_fill(1, y_new, False)
    blocked = torch.cat([blocked_new, unseen.expand(len(logits) - n, c)])
    logp = F.log_softmax(logits.masked_fill(blocked, float("-inf")), dim=1)
    return F.nll_loss(logp[:n], y_new) + F.nll_loss(logp[n:], y_buf)
