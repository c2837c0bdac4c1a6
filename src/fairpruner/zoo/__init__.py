"""Model zoo of small classification networks for exercising the pruner.

All models are plain ``nn.Module`` graphs (standard layers, no data-dependent
control flow) so that dependency tracing and ``torch.fx`` work on them.

Example:
    >>> from fairpruner import zoo
    >>> model = zoo.create("resnet20", num_classes=100)
    >>> model.eval()(zoo.example_input("resnet20")).shape
    torch.Size([2, 100])
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from ._densenet import DenseNet, densenet
from ._imagenet import ImageNetMobileNetV2, ResNet50, mobilenet_v2, resnet50
from ._mobilenetv2 import MobileNetV2, mobilenetv2
from ._moe import MoE, MoEClassifier, moe_classifier
from ._resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet56, resnet110
from ._small import (
    MLP,
    Conv1dNet,
    DigitsCNN,
    GroupNormCNN,
    conv1d_net,
    digits_cnn,
    groupnorm_cnn,
    mlp,
)
from ._transformer import ConvNeXt, VisionTransformer, convnext_atto, deit_tiny, vit_tiny_cifar
from ._sequence import RecurrentClassifier, gru_classifier, lstm_classifier
from ._vgg import VGG, vgg, vgg11_bn, vgg16_bn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "Conv1dNet",
    "ConvNeXt",
    "DenseNet",
    "DigitsCNN",
    "GroupNormCNN",
    "ImageNetMobileNetV2",
    "MLP",
    "MobileNetV2",
    "RecurrentClassifier",
    "ResNet50",
    "MoE",
    "MoEClassifier",
    "VGG",
    "VisionTransformer",
    "conv1d_net",
    "convnext_atto",
    "create",
    "deit_tiny",
    "densenet",
    "digits_cnn",
    "example_input",
    "groupnorm_cnn",
    "gru_classifier",
    "input_shape",
    "list_models",
    "lstm_classifier",
    "mlp",
    "mobilenet_v2",
    "mobilenetv2",
    "moe_classifier",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet50",
    "vgg",
    "vgg11_bn",
    "vgg16_bn",
    "vit_tiny_cifar",
]

_CIFAR = (3, 32, 32)

# name -> (factory, per-sample input shape with default arguments)
_REGISTRY: Dict[str, Tuple[Callable[..., nn.Module], Tuple[int, ...]]] = {
    "resnet20": (resnet20, _CIFAR),
    "resnet32": (resnet32, _CIFAR),
    "resnet56": (resnet56, _CIFAR),
    "resnet110": (resnet110, _CIFAR),
    "vgg11_bn": (vgg11_bn, _CIFAR),
    "vgg16_bn": (vgg16_bn, _CIFAR),
    "mobilenetv2": (mobilenetv2, _CIFAR),
    "densenet": (densenet, _CIFAR),
    "mlp": (mlp, (64,)),
    "conv1d_net": (conv1d_net, (1, 64)),
    "groupnorm_cnn": (groupnorm_cnn, _CIFAR),
    "digits_cnn": (digits_cnn, (1, 8, 8)),
    "lstm_classifier": (lstm_classifier, (16, 12)),  # (time, features)
    "gru_classifier": (gru_classifier, (16, 12)),
    # create("deit_tiny") keeps the zoo's 10-class default; deit_tiny() itself defaults to ImageNet's 1000.
    "deit_tiny": (functools.partial(deit_tiny, num_classes=10), (3, 224, 224)),
    "vit_tiny_cifar": (vit_tiny_cifar, _CIFAR),
    "convnext_atto": (convnext_atto, _CIFAR),
    "moe_classifier": (moe_classifier, (8, 16)),
    # ImageNet models with torchvision names; the factories default to 1000 classes, create() to 10.
    "resnet50": (functools.partial(resnet50, num_classes=10), (3, 224, 224)),
    "mobilenet_v2": (functools.partial(mobilenet_v2, num_classes=10), (3, 224, 224)),
}


def list_models() -> List[str]:
    """Names accepted by :func:`create`, sorted alphabetically."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> Tuple[Callable[..., nn.Module], Tuple[int, ...]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"Unknown model {name!r}; known models: {known}") from None


def create(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model.

    Args:
        name: Registered model name, see :func:`list_models`.
        **kwargs: Forwarded to the model's factory (e.g. ``num_classes``).

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    factory, _ = _lookup(name)
    return factory(**kwargs)


def input_shape(name: str) -> Tuple[int, ...]:
    """Per-sample input shape a registered model expects with default arguments.

    Args:
        name: Registered model name.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return _lookup(name)[1]


def example_input(name: str, batch_size: int = 2) -> torch.Tensor:
    """Random standard-normal input batch shaped for a registered model.

    Args:
        name: Registered model name.
        batch_size: Leading batch dimension.

    Returns:
        Tensor of shape ``(batch_size, *input_shape(name))``.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return torch.randn(batch_size, *input_shape(name))
