"""Backbones with a linear head over all classes of the benchmark.

Every model has ``features(x) -> [B, feature_dim]``, ``head: nn.Linear(feature_dim, num_classes)`` and
``forward(x) = head(features(x))``. Inputs are float tensors (the method turns stored uint8 images into them:
Method.to_input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn

from cil.core.models.mlp import MLP
from cil.core.models.resnet import ResNet18, reduced_resnet18, resnet18
from cil.errors import ConfigError


class Backbone(Protocol):
    """What every model here has beyond nn.Module (the methods reach it under a torch.compile wrapper, through
    `_orig_mod`, where nn.Module's attribute typing cannot see it)."""

    feature_dim: int
    head: nn.Linear

    def features(self, x: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor) -> Tensor: ...


MODEL_NAMES = ("mlp", "reduced_resnet18", "resnet18")
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "reduced_resnet18": reduced_resnet18,
    "resnet18": resnet18,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs: Any) -> nn.Module:
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](tuple(input_shape), num_classes, **kwargs)


__all__ = ["Backbone", "MODEL_NAMES", "build_model", "MLP", "ResNet18", "resnet18", "reduced_resnet18"]
