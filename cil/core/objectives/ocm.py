"""OCM's losses (Guo, Liu, Zhao, ICML 2022), as its official code computes them (gydpku/OCM,
InfoNCE/contrastive_learning.py and test_cifar10.py); docs/methods.md, "OCM", states them as equations.

Every contrastive loss here takes a similarity matrix S [R, K] (rows: anchors; columns: candidates) and one label
per row, and works on the row-wise "loss matrix"

    L_ij = -log( E_ij / (sum_k E_ik + eps) + eps ),   E_ij = exp((S_ij - max_k S_ik) / tau)

(the row maximum is a constant: it carries no gradient). Positives of row i are the columns j whose row label
equals row i's (the anchor itself included), weighted 1 / (|positives of i| + eps). The three forms:
- ``ocm_nt_xent_new`` (the official `Supervised_NT_xent_n`, new data): E_ii = 0 (the anchor is not a candidate;
  its own L_ii = -log(eps) is a constant that stays in the mask's average), S holds two views [v; v'] of B rows
  each; loss = mean_i L_{i, pair(i)} + 2 * mean_i sum_j P_ij L_ij with pair(i) = i +- B.
- ``ocm_nt_xent_buffer`` (`Supervised_NT_xent_uni`, replayed data): the anchor stays a candidate;
  loss = mean_i sum_j P_ij L_ij.
- ``ocm_nt_xent_previous`` (`Supervised_NT_xent_pre`): the same as the buffer form on a matrix between the current
  and the previous model's features, labels not repeated.
No host/device synchronisation: shapes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import cross_entropy_masked

__all__ = [
    "ocm_nt_xent_new",
    "ocm_nt_xent_buffer",
    "ocm_nt_xent_previous",
    "ocm_similarity",
    "ocm_ce",
    "old_logit_mse",
    "EPS",
]

EPS = 1e-8  # the official code's eps, inside and outside the log


def _loss_matrix(sim: Tensor, temperature: float, drop_self: bool) -> Tensor:
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(sim / temperature)
    if drop_self:
        e = e * (1 - torch.eye(sim.shape[0], sim.shape[1], dtype=e.dtype, device=e.device))
    return -torch.log(e / (e.sum(dim=1, keepdim=True) + EPS) + EPS)


def _positives(labels: Tensor, dtype: torch.dtype) -> Tensor:
    same = (labels[:, None] == labels[None, :]).to(dtype)
    return same / (same.sum(dim=1, keepdim=True) + EPS)


def ocm_nt_xent_new(sim: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The new-data form. ``sim`` [2B, 2B] over [views; augmented views]; ``labels`` [2B] (the B labels twice)."""
    rows = sim.shape[0]
    b = rows // 2
    loss = _loss_matrix(sim, temperature, drop_self=True)
    pair = torch.cat([loss[:b, b:].diagonal(), loss[b:, :b].diagonal()]).sum() / (2 * b)
    return pair + 2 * (_positives(labels, loss.dtype) * loss).sum() / (2 * b)


def ocm_nt_xent_buffer(sim: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The replayed-data form. ``sim`` [2B, 2B]; ``labels`` [2B]."""
    loss = _loss_matrix(sim, temperature, drop_self=False)
    return (_positives(labels, loss.dtype) * loss).sum() / (2 * (sim.shape[0] // 2))


def ocm_nt_xent_previous(sim: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The preservation form: ``sim`` [R, R] between the current model's projections (rows) and the previous
    model's (columns) of the same R images; ``labels`` [R]."""
    return ocm_nt_xent_buffer(sim, labels, temperature)


def ocm_similarity(z: Tensor, feats: Tensor, start: Tensor, weight: float) -> Tensor:
    """S = weight * z z^T + weight * z f[:, start:start+P]^T: ``z`` [R, P] the normalised projections, ``feats``
    [R, D] the normalised backbone features (D > P), ``start`` a 0-d long tensor in [0, D - P) (a random window
    of the features, gathered on the device: no read-back)."""
    window = feats.index_select(1, start + torch.arange(z.shape[1], device=z.device))
    return weight * (z @ window.t()) + weight * (z @ z.t())


def ocm_ce(logits: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-entropy; softmax over the whole head (``mask`` None, the official code) or over ``mask``."""
    return F.cross_entropy(logits, targets) if mask is None else cross_entropy_masked(logits, targets, mask)


def old_logit_mse(logits: Tensor, previous: Tensor, old: Tensor, n_old: int) -> Tensor:
    """F.mse_loss over the old classes' columns only (``old`` bool [C], ``n_old`` of them): the mean over rows and
    old columns of (previous - logits)^2."""
    diff = (previous - logits).square() * old.to(logits.dtype)
    return diff.sum() / (logits.shape[0] * max(n_old, 1))
