"""The options of :func:`fairpruner.plan` and :func:`fairpruner.sweep`: their choices, their defaults with the
evidence each was chosen by, and the checks that refuse a bad value before any planning."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np
import torch

from .._errors import PlanError
from .._scoring.scores import GroupScores

__all__ = ["SIGNALS", "ALLOCATIONS", "TIES", "STREAM_FLOORS", "STREAM_FLOOR", "STREAM_WEIGHT", "FLOORS", "AUTO_FLOORS",
           "MACS_POWER", "AUTO_POWERS", "WIDTH_POWER", "AUTO_WIDTH_POWERS", "AUTO_TARGETS", "Signal", "check_args",
           "check_depth_options", "alpha_rules", "fraction"]

SIGNALS = ("u", "l1", "taylor", "random")
# ToD levels of residual-stream groups are multiplied by this (with STREAM_FLOORS' "capped", chosen on a
# validation split of CIFAR-10 training images, ResNet-20 and ResNet-56, 3 calibration seeds: see the README's
# accuracy section).
STREAM_WEIGHT = 8.0
ALLOCATIONS = ("tod", "uniform")
# How a params/MACs target orders ToD's steps of equal price: "r" (the running maximum of relative R per unit
# of cost, chosen on the validation split), "u" (relative U per unit of cost: the previous rule) or "share"
# (an equal share of every group's alpha=0 count: the one before).
TIES = ("r", "u", "share")
# How much of a residual stream's alpha=0 count is free; each rule is spelled out in depths.free_floor. "shallow"
# (the default) was chosen on the validation split: ResNet-56 +1.4 to +2.6 pt at 20-65 % MACs over "writers" (the
# previous default), ResNet-20 and VGG-16-BN plans unchanged (README); "free" is the paper's.
STREAM_FLOORS = ("shallow", "writers", "capped", "sqrt", "free", "none")
STREAM_FLOOR = "shallow"
# How much of any other group's alpha=0 count is free: "free" (all of it: the paper's ToD), "sqrt" (at most
# floor(sqrt(n)) units, the rest at the group's first positive level), "none" (only positive levels), "auto"
# (the default: for a params/MACs target, "free" or "sqrt", whichever plan removes the least total R-Score,
# chosen together with macs_power; alone, "sqrt" lost ResNet-56 0.8 pt at 20 % MACs on the validation split
# while it won VGG-16-BN 0.4 pt).
FLOORS = ("auto", "free", "sqrt", "none")
AUTO_FLOORS = ("free", "sqrt")  # "free" first: it wins ties
# Every group's ToD levels are weighted by (the MACs one of its units holds / a typical unit's) ** macs_power,
# so that layers whose units each hold many MACs (narrow, high-resolution) are cut at a proportionally higher
# level (0: the paper's one alpha for every layer). "auto" (the default, chosen on a validation split of
# CIFAR-10 training images, three models, 3 calibration seeds; README) gives a params/MACs target the power of
# AUTO_POWERS whose plan removes the least total R-Score; the best sign differs between models.
MACS_POWER: Union[str, float] = "auto"
AUTO_POWERS = (0.0, -0.25, 0.25)  # 0 first: it wins ties
# Every group's ToD levels are also weighted by (its units / the typical group's) ** -width_power, so that wide
# layers are cut at a proportionally lower level than narrow ones. "auto" (the default) adds, for a MACs target,
# the plans with width_power=1 to the candidates of floor and macs_power above, the least total R-Score choosing
# among all of them: on the validation split it changed VGG-16-BN's plans (+0.32 / +0.49 / -0.09 / +1.55 pt at
# 20 / 35 / 50 / 65 % MACs) and none of ResNet-20's or ResNet-56's (README). A params target keeps 0: there the
# R-Score picks 1 on every ResNet plan, and on ResNet-56's validation images that lost more than it won.
WIDTH_POWER: Union[str, float] = "auto"
AUTO_WIDTH_POWERS = (0.0, 1.0)  # 0 first: it wins ties
# The targets for which each "auto" option chooses among its candidates; elsewhere (an alpha, and width_power for a
# params target) it is the fixed rule alpha_rules gives.
AUTO_TARGETS = {"floor": ("params", "macs"), "macs_power": ("params", "macs"), "width_power": ("macs",)}
Signal = Union[str, Callable[[GroupScores], torch.Tensor]]


def fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], or a PlanError naming ``name``."""
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not number or not math.isfinite(value) or not 0 <= value <= 1:
        raise PlanError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def check_depth_options(stream_weight: Any, stream_floor: Any, floor: Any, macs_power: Any = 0.0,
                        width_power: Any = 0.0) -> None:
    """Refuses a bad option of how deep ToD cuts each group (shared by plans and sweeps)."""
    for name, v in (("macs_power", macs_power), ("width_power", width_power)):
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                            or abs(v) > 2):
            raise PlanError(f"{name} must be \"auto\" or a number in [-2, 2], got {v!r}.")
    if isinstance(stream_weight, bool) or not isinstance(stream_weight, numbers.Real) or \
            not math.isfinite(stream_weight) or stream_weight < 1:
        raise PlanError(f"stream_weight must be a number >= 1, got {stream_weight!r}.")
    if stream_floor not in STREAM_FLOORS:
        raise PlanError(f"stream_floor={stream_floor!r} is not one of {STREAM_FLOORS}.")
    if floor not in FLOORS:
        raise PlanError(f"floor={floor!r} is not one of {FLOORS}.")


def alpha_rules(floor: str, macs_power: Union[str, float],
                width_power: Union[str, float] = 0.0) -> Tuple[str, float, float]:
    """The floor rule, MACs power and width power of a plan that cannot choose: "auto" means the paper's rules
    (free floor, powers 0), since plans of different sizes cannot be compared."""
    return ("free" if floor == "auto" else floor), (0.0 if macs_power == "auto" else float(macs_power)), \
        (0.0 if width_power == "auto" else float(width_power))


def check_args(alpha: Optional[float], params: Optional[float], macs: Optional[float], signal: Signal,
               allocation: str, stream_weight: float, ties: str, stream_floor: str, floor: str,
               macs_power: Union[str, float] = 0.0, seed: int = 0, width_power: Union[str, float] = 0.0) -> tuple:
    """The target of a :func:`fairpruner.plan` call as ``(key, value)``, once every option is checked."""
    given = [(k, v) for k, v in (("alpha", alpha), ("params", params), ("macs", macs)) if v is not None]
    if len(given) != 1:
        raise PlanError("Give exactly one of alpha= (ToD level), params= or macs= (fraction to remove); "
                        f"got {[k for k, _ in given] or 'none'}.")
    key, value = given[0]
    value = fraction(key, value)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise PlanError(f"seed must be an integer, got {seed!r}.")
    if allocation not in ALLOCATIONS:
        raise PlanError(f"allocation={allocation!r} is not one of {ALLOCATIONS}.")
    if ties == "cost":
        raise PlanError('ties="cost" is now called "u" (relative U per unit of cost); the default is "r".')
    if ties not in TIES:
        raise PlanError(f"ties={ties!r} is not one of {TIES}.")
    if not callable(signal) and signal not in SIGNALS:
        raise PlanError(f"signal={signal!r} is not one of {SIGNALS} or a callable.")
    if allocation == "uniform" and key == "alpha":
        raise PlanError("Uniform allocation has no alpha; give params= or macs= (fraction to remove).")
    check_depth_options(stream_weight, stream_floor, floor, macs_power, width_power)
    return key, value
