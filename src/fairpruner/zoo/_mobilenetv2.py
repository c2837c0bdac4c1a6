"""MobileNetV2 (Sandler et al., 2018) adapted to 32x32 inputs.

The stem and the first two bottleneck stages keep stride 1, so the network
downsamples 32 -> 4 over three stride-2 stages instead of 224 -> 7.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ._common import conv_bn_relu6, init_weights, make_divisible

__all__ = ["MobileNetV2", "InvertedResidual", "mobilenetv2"]

# Expansion t, output channels c, repeats n, first stride s.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, optional residual.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the depthwise convolution.
        expand_ratio: Hidden width as a multiple of ``in_ch``; 1 skips the expansion.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers += conv_bn_relu6(in_ch, hidden, 1)
        layers += conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        # Linear bottleneck: no activation after the projection.
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 3x32x32 inputs.

    Args:
        num_classes: Number of output logits.
        width_mult: Multiplier on every layer width, rounded to multiples of 8.
        dropout: Dropout probability before the classifier.
        in_channels: Channels of the input image.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * width_mult)

        layers: List[nn.Module] = conv_bn_relu6(in_channels, in_ch, 3, stride=1)
        for t, c, n, s in CIFAR_SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers += conv_bn_relu6(in_ch, self.last_channel, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)
        # Small head init as in the reference implementation.
        nn.init.normal_(self.classifier[1].weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for CIFAR (about 2.2M parameters at ``width_mult=1``).

    Args:
        num_classes: Number of output logits.
        width_mult: Multiplier on every layer width, rounded to multiples of 8.
    """
    return MobileNetV2(num_classes, width_mult)
