"""Logit distillation: the temperature-scaled KL divergence of knowledge distillation (Hinton et al., 2015), as
MKD's `WKDLoss` (groups=None) and CCL-DC's `kl_loss` compute it.

``kd_loss(student, teacher, T) = T^2 * mean_i sum_c p^T_ic (log p^T_ic - log p^S_ic)`` with
``p^T = softmax(teacher / T)``, ``p^S = softmax(student / T)``. The teacher's logits are detached: the term never
sends a gradient into the teacher. ``mask`` (bool [C], optional) restricts both softmaxes to the masked classes
(our convention: the seen classes); classes outside contribute exactly 0 and get exactly 0 gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import mask_logits, zero_loss

__all__ = ["kd_loss"]


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    if student.shape[0] == 0:
        return zero_loss(student)
    s, t = student / temperature, teacher.detach() / temperature
    if mask is not None:
        s, t = mask_logits(s, mask), mask_logits(t, mask)
    logp_s, logp_t = torch.log_softmax(s, dim=1), torch.log_softmax(t, dim=1)
    if mask is not None:  # -inf - -inf outside the mask: those terms are 0 (p^T = 0 there)
        logp_s = torch.where(mask, logp_s, torch.zeros_like(logp_s))
        logp_t = torch.where(mask, logp_t, torch.zeros_like(logp_t))
    return (logp_t.exp() * (logp_t - logp_s)).sum(1).mean() * temperature**2
