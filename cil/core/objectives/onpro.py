"""OnPro's losses (Wei et al., ICCV 2023, "Online Prototype Learning for Online Continual Learning"), as its
official code computes them, batched and free of host/device synchronisation.

- The instance-wise supervised contrastive loss OnPro inherits from OCM is OCM's (`cil.core.objectives.ocm`:
  `ocm_nt_xent_new` on the incoming batch, `ocm_nt_xent_buffer` on the replayed one).
- `prototype_loss`: Online Prototype Equilibrium (OPE): per class present in a batch, the prototype of each
  view is the mean of the (L2-normalised) projections of its samples; the two views' normalised prototypes
  are contrasted, the same class's prototype in the other view being the only positive.
- `mixup_cross_entropy`: (1 - lambda) CE(y_a) + lambda CE(y_b), averaged over rows (over the whole head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_prototypes", "prototype_loss", "mixup_cross_entropy"]


def class_prototypes(z: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(mean of the rows of ``z`` [N, D] per class [num_classes, D] (0 for absent classes), present bool
    [num_classes])."""
    onehot = F.one_hot(labels, num_classes).to(z.dtype)  # [N, C]
    counts = onehot.sum(dim=0)
    means = (onehot.t() @ z) / counts.clamp(min=1.0)[:, None]
    return means, counts > 0


def prototype_loss(
    z1: Tensor, z2: Tensor, labels: Tensor, num_classes: int, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OPE on two views' L2-normalised projections ``z1``, ``z2`` [N, D] of the samples with ``labels`` [N].

    With K classes present, p^v_c = normalise(mean of z^v over class c) for v = 1, 2; over the 2K prototypes
    u, the loss is -1/2K sum_i log( exp(u_i . u_i+ / T) / sum_{j != i} exp(u_i . u_j / T) ), u_i+ being the
    same class's prototype of the other view. Returns (loss, the un-normalised class means of view 1 and of
    view 2 [num_classes, D] (0 for absent classes), present bool [num_classes]). K = 1 gives 0 (its only
    candidate is its positive).
    """
    c = num_classes
    m1, present = class_prototypes(z1, labels, c)
    m2, _ = class_prototypes(z2, labels, c)
    u = F.normalize(torch.cat([m1, m2]).float(), dim=1)  # [2C, D]
    logits = u @ u.t() / temperature
    present2 = torch.cat([present, present])
    eye = torch.eye(2 * c, dtype=torch.bool, device=u.device)
    # columns: present prototypes other than the row itself; every row keeps at least one (labels non-empty)
    allowed = present2[None, :] & ~eye
    lse = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=1)
    partner = torch.cat([torch.arange(c, 2 * c), torch.arange(c)]).to(u.device)
    log_prob = logits.gather(1, partner[:, None]).squeeze(1) - lse
    weight = present2.to(log_prob.dtype)
    loss = -(log_prob * weight).sum() / weight.sum()
    return loss, m1, m2, present


def mixup_cross_entropy(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: Tensor) -> Tensor:
    """mean_i[(1 - lam_i) CE(logits_i, y_a_i) + lam_i CE(logits_i, y_b_i)], softmax over the whole head (the
    official `loss_mixup`). lam = 0 gives the plain cross-entropy on y_a."""
    logp = F.log_softmax(logits.float(), dim=1)
    nll_a = -logp.gather(1, y_a[:, None]).squeeze(1)
    nll_b = -logp.gather(1, y_b[:, None]).squeeze(1)
    return ((1.0 - lam) * nll_a + lam * nll_b).mean()
