"""Pure losses on tensors: no loop, no framework. See each module's docstring."""

from .common import classes_mask, cross_entropy_masked, mask_logits
from .er import er_loss
from .er_ace import er_ace_loss, er_ace_loss_joint
from .gsa import GradientStats, balance_weights, gsa_new_loss, gsa_replay_loss

__all__ = [
    "mask_logits",
    "classes_mask",
    "cross_entropy_masked",
    "er_loss",
    "er_ace_loss",
    "er_ace_loss_joint",
    "GradientStats",
    "balance_weights",
    "gsa_new_loss",
    "gsa_replay_loss",
]
