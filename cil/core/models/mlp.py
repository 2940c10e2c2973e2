"""Multi-layer perceptron for flat or image inputs (the MNIST-style baseline of the online-CL literature)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """flatten -> [Linear -> ReLU] x len(hidden) -> linear head over all classes of the benchmark."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (400, 400)):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(torch.flatten(x, 1))  # flatten copies if x is channels_last, so any layout works
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits
