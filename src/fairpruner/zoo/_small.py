"""Small models for unit tests and demos: MLP, 1-D CNN, GroupNorm CNN, digits CNN."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from ._common import init_weights

__all__ = [
    "MLP",
    "Conv1dNet",
    "GroupNormCNN",
    "DigitsCNN",
    "mlp",
    "conv1d_net",
    "groupnorm_cnn",
    "digits_cnn",
]


class MLP(nn.Module):
    """Flatten followed by Linear-(BatchNorm1d)-ReLU blocks and a linear head.

    Args:
        in_features: Size of the flattened input.
        hidden: Widths of the hidden layers.
        num_classes: Number of output logits.
        batch_norm: Insert BatchNorm1d after each hidden linear layer.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 64),
        num_classes: int = 10,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Conv1dNet(nn.Module):
    """Conv1d-BN-ReLU-MaxPool1d blocks, global average pool, linear head.

    Args:
        in_channels: Channels of the input sequence.
        length: Expected sequence length; must survive one halving per block.
        channels: Output widths of the conv blocks.
        num_classes: Number of output logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        length: int = 64,
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if length < 2 ** len(channels):
            raise ValueError(f"length {length} is too short for {len(channels)} pooling stages")
        self.in_channels = in_channels
        self.length = length
        layers: List[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [
                nn.Conv1d(width, c, 3, padding=1, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool1d(2),
            ]
            width = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


class _GNResidualBlock(nn.Module):
    """Two Conv-GroupNorm layers with an identity shortcut.

    The identity add ties the output channels of the preceding conv (and its
    GroupNorm) to those of ``conv2``/``gn2``, so a pruner must remove them together.

    Args:
        channels: Input and output channels.
        groups: Number of GroupNorm groups.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return torch.relu(out + x)


class GroupNormCNN(nn.Module):
    """Conv-GroupNorm-ReLU stages with max pooling, a residual block, pool and head.

    Args:
        in_channels: Channels of the input image.
        channels: Output widths of the conv stages; each must be divisible by ``groups``.
        groups: Number of GroupNorm groups.
        num_classes: Number of output logits.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64),
        groups: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if not channels or any(c % groups for c in channels):
            raise ValueError(f"every width in {tuple(channels)} must be divisible by groups={groups}")
        layers: List[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(width, c, 3, padding=1, bias=False),
                nn.GroupNorm(groups, c),
                nn.ReLU(inplace=True),
            ]
            width = c
        layers.append(_GNResidualBlock(width, groups))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


class DigitsCNN(nn.Module):
    """Tiny CNN for 1x8x8 images (scikit-learn digits).

    Args:
        num_classes: Number of output logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (128, 64),
    num_classes: int = 10,
    batch_norm: bool = False,
) -> MLP:
    """Multi-layer perceptron over flattened inputs (e.g. 8x8 digits as 64 features).

    Args:
        in_features: Size of the flattened input.
        hidden: Widths of the hidden layers.
        num_classes: Number of output logits.
        batch_norm: Insert BatchNorm1d after each hidden linear layer.
    """
    return MLP(in_features, hidden, num_classes, batch_norm)


def conv1d_net(
    in_channels: int = 1,
    length: int = 64,
    channels: Sequence[int] = (16, 32),
    num_classes: int = 10,
) -> Conv1dNet:
    """1-D CNN for ``(in_channels, length)`` sequences.

    Args:
        in_channels: Channels of the input sequence.
        length: Expected sequence length.
        channels: Output widths of the conv blocks.
        num_classes: Number of output logits.
    """
    return Conv1dNet(in_channels, length, channels, num_classes)


def groupnorm_cnn(
    in_channels: int = 3,
    channels: Sequence[int] = (32, 64),
    groups: int = 8,
    num_classes: int = 10,
) -> GroupNormCNN:
    """CNN with GroupNorm and a residual block, for 32x32 images.

    Args:
        in_channels: Channels of the input image.
        channels: Output widths of the conv stages; each must be divisible by ``groups``.
        groups: Number of GroupNorm groups.
        num_classes: Number of output logits.
    """
    return GroupNormCNN(in_channels, channels, groups, num_classes)


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """Tiny CNN for 1x8x8 scikit-learn digits; trains in seconds on CPU.

    Args:
        num_classes: Number of output logits.
    """
    return DigitsCNN(num_classes)
