"""Helpers shared by the zoo's model definitions."""

from __future__ import annotations

from typing import List

import torch.nn as nn

__all__ = ["conv_bn_relu6", "init_weights", "make_divisible"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal init for conv/linear weights, unit/zero init for norms.

    Args:
        model: Module whose submodules are initialised in place.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``.

    Never rounds down by more than 10%, following the reference MobileNet code.

    Args:
        value: Unrounded channel count.
        divisor: Required factor of the result.
        min_value: Lower bound of the result; defaults to ``divisor``.

    Returns:
        The rounded channel count.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> List[nn.Module]:
    """Conv (no bias, "same" padding for odd kernels) -> BatchNorm -> ReLU6, as MobileNetV2 builds them."""
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    ]
