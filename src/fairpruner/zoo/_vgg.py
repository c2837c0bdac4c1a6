"""VGG for CIFAR: 3x3 conv stacks with max pooling and a single linear head."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._common import init_weights

__all__ = ["VGG", "CFGS", "vgg", "vgg11_bn", "vgg16_bn"]

CfgItem = Union[int, str]

# "M" marks a 2x2 max pool; integers are output channels of a 3x3 conv.
CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-style network built from a layer configuration.

    The feature map is globally average-pooled before the classifier, which is
    a no-op for the standard configs on 32x32 inputs (five pools leave 1x1) and
    keeps the head at ``Linear(last_channels, num_classes)`` for any ``cfg``.

    Args:
        cfg: Sequence of conv output widths and ``"M"`` (max pool) markers.
        num_classes: Number of output logits.
        batch_norm: Insert BatchNorm after each convolution.
        in_channels: Channels of the input image.
    """

    def __init__(
        self,
        cfg: Sequence[CfgItem],
        num_classes: int = 10,
        batch_norm: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [c for c in cfg if c != "M"]
        if not widths:
            raise ValueError("cfg must contain at least one convolution width")
        self.features = self._make_features(cfg, batch_norm, in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(int(widths[-1]), num_classes)
        init_weights(self)
        # Kaiming fan-out on a 512 -> 10 classifier gives logits of std ~10 and the first epoch diverges; the
        # torchvision VGG recipe draws the classifier from N(0, 0.01).
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    @staticmethod
    def _make_features(cfg: Sequence[CfgItem], batch_norm: bool, in_channels: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = int(item)
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def vgg(
    cfg: Optional[Sequence[CfgItem]] = None,
    num_classes: int = 10,
    batch_norm: bool = True,
    in_channels: int = 3,
) -> VGG:
    """Build a VGG from an explicit configuration (defaults to VGG-16).

    Args:
        cfg: Conv widths and ``"M"`` pool markers, e.g. ``[16, "M", 32, "M"]``.
        num_classes: Number of output logits.
        batch_norm: Insert BatchNorm after each convolution.
        in_channels: Channels of the input image.
    """
    return VGG(CFGS["vgg16"] if cfg is None else cfg, num_classes, batch_norm, in_channels)


def vgg11_bn(num_classes: int = 10) -> VGG:
    """VGG-11 with BatchNorm for CIFAR (about 9.2M parameters).

    Args:
        num_classes: Number of output logits.
    """
    return VGG(CFGS["vgg11"], num_classes, batch_norm=True)


def vgg16_bn(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm for CIFAR (about 14.7M parameters).

    Args:
        num_classes: Number of output logits.
    """
    return VGG(CFGS["vgg16"], num_classes, batch_norm=True)
