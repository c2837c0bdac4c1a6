"""DenseNet-BC (Huang et al., 2017) for 32x32 inputs.

Each dense layer returns ``torch.cat([x, new], 1)``, so every later layer's
input channels are a concatenation of earlier outputs: a demanding case for a
pruner's channel-index bookkeeping.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from ._common import init_weights

__all__ = ["DenseNet", "densenet"]


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck) then BN-ReLU-Conv3x3, concatenated to the input.

    Args:
        in_ch: Input channels.
        growth_rate: Channels added by this layer.
        bn_size: Bottleneck width as a multiple of ``growth_rate``.
    """

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        inner = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU is safe: it acts on the BN output, never on x itself.
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        return torch.cat([x, new], 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2d(2) between dense blocks.

    Args:
        in_ch: Input channels.
        out_ch: Output channels (compressed).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC with a 3x3 stem for 3x32x32 inputs.

    Args:
        num_classes: Number of output logits.
        growth_rate: Channels added per dense layer.
        block_config: Number of dense layers in each block.
        bn_size: Bottleneck width as a multiple of ``growth_rate``.
        compression: Channel reduction factor of the transitions, in (0, 1].
        in_channels: Channels of the input image.
    """

    def __init__(
        self,
        num_classes: int = 10,
        growth_rate: int = 12,
        block_config: Sequence[int] = (6, 6, 6),
        bn_size: int = 4,
        compression: float = 0.5,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        channels = 2 * growth_rate
        layers: List[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for i, num_layers in enumerate(block_config):
            block: List[nn.Module] = []
            for _ in range(num_layers):
                block.append(_DenseLayer(channels, growth_rate, bn_size))
                channels += growth_rate
            layers.append(nn.Sequential(*block))
            if i != len(block_config) - 1:
                out_ch = int(channels * compression)
                layers.append(_Transition(channels, out_ch))
                channels = out_ch
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def densenet(
    num_classes: int = 10,
    growth_rate: int = 12,
    block_config: Sequence[int] = (6, 6, 6),
    bn_size: int = 4,
    compression: float = 0.5,
) -> DenseNet:
    """DenseNet-BC for CIFAR; the defaults (depth 40) give about 0.18M parameters.

    Args:
        num_classes: Number of output logits.
        growth_rate: Channels added per dense layer.
        block_config: Number of dense layers in each block.
        bn_size: Bottleneck width as a multiple of ``growth_rate``.
        compression: Channel reduction factor of the transitions, in (0, 1].
    """
    return DenseNet(num_classes, growth_rate, block_config, bn_size, compression)
