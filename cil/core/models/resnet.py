"""ResNet-18 for small images (CIFAR-style): 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2].

Widths nf, 2nf, 4nf, 8nf; global average pooling makes it work for any input size (28x28, 32x32, 64x64).
``pool="avg4"`` pools with a fixed 4x4 window instead, as mkd_ocl's and CCL-DC's ResNet-18 do
(`F.avg_pool2d(out, 4)`): the same 8nf features on 32x32 inputs (a 4x4 map), 4 x 8nf on 64x64 (a 2x2 map).
- ``resnet18``: nf = 64, 512-d features; the GSA paper's backbone (11.17M parameters with 10 classes).
- ``reduced_resnet18``: nf = 20, 160-d features; the reduced ResNet-18 of the GEM / ER / MIR / ER-ACE code bases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cil.errors import ConfigError

POOLS = ("global", "avg4")  # model.pool


def final_map_size(size: int) -> int:
    """Side of the last stage's map for an input side `size` (three stride-2 3x3 convolutions, padding 1)."""
    for _ in range(3):
        size = (size - 1) // 2 + 1
    return size


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
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, nf: int = 64, pool: str = "global"):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"model.pool={pool!r} is not allowed: choose one of {POOLS}")
        self.pool = pool
        in_channels = input_shape[0]
        self.conv1, self.bn1 = conv3x3(in_channels, nf), nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, width in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 8 * nf
        if pool == "avg4":
            cells = [final_map_size(side) // 4 for side in input_shape[1:]]
            if min(cells) < 1:
                raise ConfigError(
                    f"model.pool='avg4' needs inputs of at least 25x25 pixels (a 4x4 map after the last stage); "
                    f"this dataset's are {input_shape[1]}x{input_shape[2]}: use model.pool=global"
                )
            self.feature_dim *= cells[0] * cells[1]
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.pool == "avg4":  # the official 4x4 window: a 2x2 map of 8nf features at 64x64 input
            return torch.flatten(F.avg_pool2d(out, 4), 1)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # 4x4 map at 32x32 input, 8x8 at 64x64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


def resnet18(input_shape: tuple[int, int, int], num_classes: int, nf: int = 64, pool: str = "global") -> ResNet18:
    return ResNet18(input_shape, num_classes, nf=nf, pool=pool)


def reduced_resnet18(
    input_shape: tuple[int, int, int], num_classes: int, nf: int = 20, pool: str = "global"
) -> ResNet18:
    return ResNet18(input_shape, num_classes, nf=nf, pool=pool)
