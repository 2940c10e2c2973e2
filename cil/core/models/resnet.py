"""ResNet-18 for small images (CIFAR-style): 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2].

Widths nf, 2nf, 4nf, 8nf; global average pooling makes it work for any input size (28x28, 32x32, 64x64).
- ``resnet18``: nf = 64, 512-d features; the GSA paper's backbone (11.17M parameters with 10 classes).
- ``reduced_resnet18``: nf = 20, 160-d features; the reduced ResNet-18 of the GEM / ER / MIR / ER-ACE code bases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)  # BN follows: no bias


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity unless the shape changes
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, nf: int = 64):
        super().__init__()
        in_channels = input_shape[0]
        self.conv1, self.bn1 = conv3x3(in_channels, nf), nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, width in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 8 * nf
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # 4x4 map at 32x32 input, 8x8 at 64x64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


def resnet18(input_shape: tuple[int, int, int], num_classes: int, nf: int = 64) -> ResNet18:
    return ResNet18(input_shape, num_classes, nf=nf)


def reduced_resnet18(input_shape: tuple[int, int, int], num_classes: int, nf: int = 20) -> ResNet18:
    return ResNet18(input_shape, num_classes, nf=nf)
