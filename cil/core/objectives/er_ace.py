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

from torch import Tensor

from .common import classes_mask, cross_entropy_masked

__all__ = ["er_ace_loss"]


def er_ace_loss(logits_new: Tensor, y_new: Tensor, logits_buf: Tensor | None, y_buf: Tensor | None,
                seen: Tensor) -> Tensor:
    """ER-ACE loss.

    ``logits_new`` [B, C], ``y_new`` [B]: the incoming batch, softmax over the classes present in ``y_new``.
    ``logits_buf`` [R, C], ``y_buf`` [R]: the replay batch, softmax over ``seen`` (bool [C]).
    An empty (R = 0) or missing replay batch gives just the incoming term.
    """
    present = classes_mask(y_new, logits_new.shape[1])
    loss = cross_entropy_masked(logits_new, y_new, present)
    if logits_buf is None or logits_buf.shape[0] == 0:
        return loss
    return loss + cross_entropy_masked(logits_buf, y_buf, seen)
