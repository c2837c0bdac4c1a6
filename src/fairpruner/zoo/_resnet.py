"""CIFAR ResNets (He et al., 2016, Section 4.2).

Three stages of 16/32/64 channels with ``n`` BasicBlocks each, for a depth of
``6n + 2``. Two shortcut flavours are provided for stage transitions:

* ``"conv"`` (option B, default): 1x1 strided convolution followed by BatchNorm.
* ``"pad"`` (option A): parameter-free identity that subsamples spatially and
  zero-pads the channel dimension. The padded channels have no producing layer,
  so a structured pruner must refuse (or special-case) this variant.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import init_weights

__all__ = ["CifarResNet", "BasicBlock", "resnet20", "resnet32", "resnet56", "resnet110"]

# Paper names ("A"/"B") are accepted as aliases.
_SHORTCUTS = {"conv": "conv", "b": "conv", "pad": "pad", "a": "pad"}


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero padding of channels.

    Args:
        in_planes: Channels of the incoming tensor.
        out_planes: Channels the shortcut must produce.
        stride: Spatial subsampling factor.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        extra = out_planes - in_planes
        self.stride = stride
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads from the last dim backwards: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the addition.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
        shortcut: ``"conv"`` (option B) or ``"pad"`` (option A); only used when
            the block changes shape.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 3x32x32 inputs.

    Args:
        depth: Network depth; must satisfy ``(depth - 2) % 6 == 0``.
        num_classes: Number of output logits.
        shortcut: ``"conv"`` (option B, 1x1 conv + BN) or ``"pad"`` (option A);
            ``"B"``/``"A"`` are accepted as aliases.
        in_channels: Channels of the input image.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        shortcut: str = "conv",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        kind = _SHORTCUTS.get(str(shortcut).lower())
        if kind is None:
            raise ValueError(f"shortcut must be 'conv' (option B) or 'pad' (option A), got {shortcut!r}")
        n = (depth - 2) // 6
        self.in_planes = 16

        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        # Module ReLU (in-place) in the stem so pruners see both activation styles.
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1, kind)
        self.layer2 = self._make_layer(32, n, 2, kind)
        self.layer3 = self._make_layer(64, n, 2, kind)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers: List[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, shortcut: str = "conv") -> CifarResNet:
    """ResNet-20 for CIFAR (about 0.27M parameters).

    Args:
        num_classes: Number of output logits.
        shortcut: ``"conv"`` (option B) or ``"pad"`` (option A).
    """
    return CifarResNet(20, num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: str = "conv") -> CifarResNet:
    """ResNet-32 for CIFAR (about 0.47M parameters).

    Args:
        num_classes: Number of output logits.
        shortcut: ``"conv"`` (option B) or ``"pad"`` (option A).
    """
    return CifarResNet(32, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "conv") -> CifarResNet:
    """ResNet-56 for CIFAR (about 0.86M parameters).

    Args:
        num_classes: Number of output logits.
        shortcut: ``"conv"`` (option B) or ``"pad"`` (option A).
    """
    return CifarResNet(56, num_classes, shortcut)


def resnet110(num_classes: int = 10, shortcut: str = "conv") -> CifarResNet:
    """ResNet-110 for CIFAR (about 1.7M parameters).

    Args:
        num_classes: Number of output logits.
        shortcut: ``"conv"`` (option B) or ``"pad"`` (option A).
    """
    return CifarResNet(110, num_classes, shortcut)
