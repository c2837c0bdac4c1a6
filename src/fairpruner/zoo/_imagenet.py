"""ImageNet ResNet-50 and MobileNetV2 with torchvision's module names.

The attribute names, layer order and parameter shapes follow ``torchvision.models.resnet50`` and
``torchvision.models.mobilenet_v2``, so a state_dict saved from torchvision loads unchanged
(``model.load_state_dict(torch.load(path, weights_only=True))``) and the pruner's tables name the layers the
way a torchvision user knows them. Written here so the zoo needs no torchvision import.

Example:
    >>> from fairpruner import zoo
    >>> model = zoo.resnet50()
    >>> model.load_state_dict(torchvision_state_dict)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from ._common import conv_bn_relu6, make_divisible

__all__ = ["Bottleneck", "ResNet50", "resnet50", "ImageNetMobileNetV2", "mobilenet_v2"]


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as torchvision's v1.5) -> 1x1 expand, plus the shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 for 224x224 ImageNet images (any size >= 32 runs: the pooling is adaptive).

    Args:
        num_classes: Number of output logits.
        layers: Bottleneck blocks per stage ((3, 4, 6, 3) is ResNet-50; (3, 4, 23, 3) ResNet-101).
    """

    def __init__(self, num_classes: int = 1000, layers: tuple = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # A Sequential (not a list) so the names are features.N.0 / .1 as torchvision's Conv2dNormActivation.
    return nn.Sequential(*conv_bn_relu6(in_ch, out_ch, kernel, stride, groups))


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = [_conv_bn_relu6(in_ch, hidden, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# Expansion t, output channels c, repeats n, first stride s (the paper's table 2).
IMAGENET_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))


class ImageNetMobileNetV2(nn.Module):
    """MobileNetV2 for 224x224 ImageNet images, named as torchvision's (``features``, ``classifier``).

    Args:
        num_classes: Number of output logits.
        width_mult: Channel multiplier (1.0 is the standard model).
        dropout: Dropout probability before the classifier.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: List[nn.Module] = [_conv_bn_relu6(3, in_ch, 3, stride=2)]
        for t, c, n, s in IMAGENET_SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(_InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(_conv_bn_relu6(in_ch, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def resnet50(num_classes: int = 1000) -> ResNet50:
    """ImageNet ResNet-50 (25.6M parameters at 1,000 classes), loadable from a torchvision state_dict.

    Args:
        num_classes: Number of output logits.
    """
    return ResNet50(num_classes)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> ImageNetMobileNetV2:
    """ImageNet MobileNetV2 (3.5M parameters at 1,000 classes), loadable from a torchvision state_dict.

    Args:
        num_classes: Number of output logits.
        width_mult: Channel multiplier.
    """
    return ImageNetMobileNetV2(num_classes, width_mult)
