"""PCR: proxy-based contrastive replay.

Lin, Zhang, Feng, Li, Ye, "PCR: Proxy-based Contrastive Replay for Online Class-Incremental Continual Learning",
CVPR 2023 (official code: FelixHuiweiLin/PCR, agents/pcr.py with utils/loss.py's SupConLoss in 'proxy' mode).

A supervised-contrastive loss whose contrast set is not the batch's samples but their classes' proxies (the
classifier's weight rows). For the N rows of the training batch (incoming and replayed images, original and
augmented views), with z_i = f(x_i) / ||f(x_i)|| and p_c = w_c / ||w_c||:

    L = mean_i [ -log( exp(z_i . p_{y_i} / tau) / sum_{j=1..N} exp(z_i . p_{y_j} / tau) ) ]

The denominator runs over the batch's rows j, each contributing its own label's proxy: only the classes
present in the batch enter, each as often as it has rows. With n_c rows of class c the denominator is
sum_c n_c exp(z_i . p_c / tau) over the present classes: a softmax over the logits z_i . p_c / tau + log n_c
, whose cross-entropy is the loss plus the constant log n_{y_i} (same gradient).
Norms are taken as ||v|| + 1e-6, as in the official code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "normalize_rows", "cosine_logits", "pcr_loss"]

#: added to every norm before dividing (the official code's 0.000001)
NORM_EPS = 1e-6


def normalize_rows(v: Tensor) -> Tensor:
    """Each row divided by (its L2 norm + 1e-6)."""
    out: Tensor = v / (v.norm(p=2, dim=1, keepdim=True) + NORM_EPS)  # Tensor.norm is unannotated in torch
    return out


def cosine_logits(features: Tensor, proxies: Tensor, temperature: float) -> Tensor:
    """[N, C] cosine similarities of the feature rows [N, D] to the proxy rows [C, D], divided by ``temperature``
    (also the evaluation head: the official cosLinear divides by its scale 0.09)."""
    return normalize_rows(features) @ normalize_rows(proxies).t() / temperature


def pcr_loss(features: Tensor, labels: Tensor, proxies: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """PCR loss (module docstring) of feature rows [N, D] with labels [N] against the proxies [C, D].

    Returns (loss, softmax logits [N, C]): the logits of the loss's softmax, cosine / tau + log(rows of the class
    in the batch), ``-inf`` for the classes absent from ``labels``; their cross-entropy against ``labels`` is the
    per-row loss plus log n_{y_i} (the same gradient; what the diagnostics are given)."""
    cos = cosine_logits(features, proxies, temperature)
    counts = torch.zeros(proxies.shape[0], dtype=cos.dtype, device=cos.device)
    logits = cos + counts.index_add(0, labels, torch.ones_like(labels, dtype=cos.dtype)).log()
    positive = cos.gather(1, labels[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - positive).mean(), logits
