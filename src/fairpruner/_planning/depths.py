"""How many units each group loses: ToD curves with their free floors, per-group weights on ToD's levels,
targets met by ToD's steps (see :mod:`.allocation`) or by one fraction of every group."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._errors import PlanError, TargetError
from .._scoring.scores import GroupScores, Scores
from .allocation import fill_target, macs_factor, step_order, tie_keys
from .tod import cap_floor, removal_limit, tod_curve

# Writers up to which a stream keeps a free cap under stream_floor="shallow" (ResNet-20's streams have 4;
# freeing 2 of 16 and 3 of 32 units of ResNet-56's, with 10, cost it 1.4 to 2.6 pt at 20-65 % MACs on the
# validation split: README), and the largest share of a stream's width that is ever free (1/8: where ResNet-20's
# 16-channel stream lost 4 for free, two seeds of five, it kept 0.8 and 1.6 pt less than with 2 on the
# validation split at 20 % MACs; README).
STREAM_WRITERS = 4
STREAM_SHARE = 8

__all__ = ["removal_limits", "uniform_counts", "curves_of", "free_floor", "group_weights", "tod_target",
           "least_r_target", "level_of", "bisect_target"]


def removed_fraction(cost, counts: np.ndarray, key: str, before: Dict[str, float]) -> float:
    """The fraction of ``before[key]`` (params or MACs) that removing ``counts`` units of each group takes away."""
    return 1.0 - cost.evaluate(counts)[key] / max(before[key], 1.0)


def distinct_percents(a: float, b: float) -> Tuple[str, str]:
    """``a`` and ``b`` as percentages with the fewest decimals (1 to 6) that tell them apart and round neither
    to 0 % or 100 % unless it is, so that a refused target near 100 % reads neither "100.0% cannot be met: the
    most is 100.0%" nor "a reduction of 100.0%" for 99.99 %. ``b``, the most that can be reached, is rounded
    down: asking for the figure named is then met."""
    for digits in range(1, 7):
        fa, fb = f"{a:.{digits}%}", f"{math.floor(b * 100 * 10 ** digits) / 10 ** digits:.{digits}f}%"
        ends = any(float(f[:-1]) in (0.0, 100.0) and x not in (0.0, 1.0) for f, x in ((fa, a), (fb, b)))
        if fa != fb and not ends:
            return fa, fb
    return f"{100 * a:.12g}%", f"{100 * b:.12g}%"  # closer than six decimals tell apart


def removal_limits(scores: Scores) -> np.ndarray:
    """The most units one round may take from each group: 99 %, or less where the group says so."""
    return np.array([removal_limit(g.n_units, g.max_removed) for g in scores.groups], dtype=np.int64)


def uniform_counts(units: np.ndarray, frac: float, limits: np.ndarray) -> np.ndarray:
    """``frac`` of every group's units, rounded, at most what one round may take (``limits``)."""
    return np.minimum(np.floor(frac * units + 0.5).astype(np.int64), limits)


def curves_of(scores: Scores, stream_floor: str, floor: str) -> List[np.ndarray]:
    """Every group's ToD curve, its free alpha=0 count limited as ``stream_floor`` (residual streams) or
    ``floor`` (every other group) says."""
    curves = [tod_curve(g.u, g.r, g.max_removed) for g in scores.groups]
    free = [free_floor(g, stream_floor if g.is_stream else floor) for g in scores.groups]
    return [c if f is None else cap_floor(c, f) for c, f in zip(curves, free)]


def free_floor(g: GroupScores, rule: str) -> Optional[int]:
    """How many of a group's alpha=0 steps stay free under ``rule`` (None: all of them).

    For streams: "shallow" gives none to the stream the output layer reads (its channels are the head's
    features; cutting them freely cost ResNet-56 3-4 pt at 35 % MACs on the validation split) nor to a stream
    that more than 4 layers write (every block adds into it and reads it: ResNet-56's 10-writer streams), and at
    most floor(sqrt(n)) and n / 8 to the others (ResNet-20's 4-writer ones: 2 of 16 and 4 of 32 units);
    "writers" gives those at most floor(sqrt(4 n / max(writers, 4))) and n / 8 whatever the writers (ResNet-56's
    streams: 2 of 16 and 3 of 32 units); "capped" is floor(sqrt(n)) whatever the writers and width, none for the
    head's. Any group: "sqrt": at most floor(sqrt(n)); "none": none; "free": all.
    """
    if rule == "free":
        return None
    if rule == "none" or (rule in ("capped", "writers", "shallow") and g.feeds_output):
        return 0
    if rule == "shallow" and g.writers > STREAM_WRITERS:
        return 0
    if rule in ("writers", "shallow"):  # alike up to STREAM_WRITERS writers: sqrt(n), at most n / 8
        return min(math.isqrt(STREAM_WRITERS * g.n_units // max(g.writers, STREAM_WRITERS)),
                   g.n_units // STREAM_SHARE)
    return math.isqrt(g.n_units)


def group_weights(scores: Scores, stream_weight: float, macs_power: float = 0.0,
                  width_power: float = 0.0) -> List[float]:
    """Each group's ToD weight: ``stream_weight`` for residual streams, 1 elsewhere, times its MACs factor
    (unit MACs / typical) ** macs_power and its width factor (units / typical) ** -width_power."""
    units = np.array([g.n_units for g in scores.groups])
    factor = np.ones(len(scores.groups)) if macs_power == 0 else \
        macs_factor(scores.cost.unit_cost()["macs"], units, macs_power)
    if width_power != 0:  # the same geometric normalisation, on the group's width
        factor = factor * macs_factor(units.astype(np.float64), units, -width_power)
    return [(stream_weight if g.is_stream else 1.0) * float(f) for g, f in zip(scores.groups, factor)]


def step_keys(scores: Scores, curves: List[np.ndarray], key: str, ties: str,
              tie_weights: List[float]) -> Optional[List[np.ndarray]]:
    """The keys ordering ToD's free steps by relative R ("r") or U ("u") per unit of ``key`` (see
    :func:`.allocation.tie_keys`); None for equal shares of every group's floor ("share")."""
    if ties not in ("r", "u"):
        return None
    rs = [g.r.numpy() for g in scores.groups] if ties == "r" else None
    return tie_keys([g.u.numpy() for g in scores.groups], curves, tie_weights, scores.cost.unit_cost()[key], rs)


def tod_target(scores: Scores, curves: List[np.ndarray], weights: List[float], key: str, value: float,
               before: Dict[str, float], ties: str = "r", tie_weights: Optional[List[float]] = None,
               keys: Optional[List[np.ndarray]] = None) -> np.ndarray:
    """ToD counts whose removal is closest to ``value`` of ``key`` (see :mod:`.allocation`); ``tie_weights``
    (default ``weights``) order the free steps by relative R ("r") or U ("u") per unit of cost, or in equal
    shares of every group's floor ("share"). ``keys``: those of :func:`step_keys`, where a caller planning
    several weightings of the same curves computed them once (they do not depend on ``weights``)."""
    cost = scores.cost
    if ties in ("r", "u"):
        keys = keys if keys is not None else step_keys(scores, curves, key, ties, tie_weights or weights)
        order = step_order(curves, weights, keys, cost.unit_cost()[key])
    else:
        order = step_order(curves, weights)

    def removed(counts: np.ndarray) -> float:
        return removed_fraction(cost, counts, key, before)

    most = removed(np.bincount(order, minlength=len(curves)))
    if most + 1e-12 < value:
        asked, reach = distinct_percents(value, most)
        raise TargetError(f"A {key} reduction of {asked} cannot be met: the most one round can remove is "
                          f"{reach} (alpha=1). Prune, fine-tune, re-score and plan again to go further.")
    return fill_target(order, len(curves), removed, value)


def least_r_target(scores: Scores, curve_sets: Dict[str, List[np.ndarray]],
                   candidates: Sequence[Tuple[str, float, float]], stream_weight: float, key: str, value: float,
                   before: Dict[str, float], ties: str,
                   ranks: Sequence[np.ndarray]) -> Tuple[str, float, float, np.ndarray]:
    """The candidate (floor rule, MACs power, width power) whose target plan removes the least total R-Score,
    with its counts; ``curve_sets`` holds each floor rule's ToD curves, and the units of each group go in the
    order of ``ranks`` (lowest first). The first candidate wins ties. One whose round cannot reach the target
    is skipped (the first one's error if none can)."""
    ties_w = group_weights(scores, stream_weight)
    weights = {(p, w): group_weights(scores, stream_weight, p, w) for _, p, w in candidates}  # not per floor
    keys = {fl: step_keys(scores, curve_sets[fl], key, ties, ties_w)  # once per floor rule, not per candidate
            for fl in dict.fromkeys(fl for fl, _, _ in candidates)}
    r_cum = [np.concatenate([[0.0], np.cumsum(g.r.double().numpy()[np.argsort(rank, kind="stable")])])
             for g, rank in zip(scores.groups, ranks)] if len(candidates) > 1 else None
    best, first_error = None, None
    for fl, p, w in candidates:
        try:
            counts = tod_target(scores, curve_sets[fl], weights[(p, w)], key, value, before, ties, ties_w, keys[fl])
        except PlanError as exc:
            first_error = first_error or exc
            continue
        damage = 0.0 if r_cum is None else float(sum(c[m] for c, m in zip(r_cum, counts)))
        if best is None or damage < best[0] - 1e-12 * max(abs(best[0]), 1.0):
            best = (damage, fl, p, w, counts)
    if best is None:
        raise first_error
    return best[1], best[2], best[3], best[4]


def level_of(curves: List[np.ndarray], counts: np.ndarray, weights: List[float]) -> float:
    """The ToD level a target plan reached: the highest (weighted) level any of its removals needed, so that
    ``plan(alpha=level)`` removes at least as many units of every group."""
    levels = [float(c[m - 1]) * w for c, m, w in zip(curves, counts, weights) if m > 0]
    return max(levels, default=0.0)


def bisect_target(cands: np.ndarray, counts_of: Callable, cost, key: str, target: float, before: Dict[str, float],
                  limit_text: str):
    """The candidate whose plan removes closest to ``target`` of ``key``: the smallest that removes at least
    the target (removal is monotone), or the one below it where that is closer."""
    def removed_frac(c):
        return removed_fraction(cost, counts_of(c), key, before)
    lo, hi = 0, len(cands) - 1
    best = removed_frac(cands[hi])
    if best + 1e-12 < target:
        asked, reach = distinct_percents(target, best)
        raise TargetError(f"A {key} reduction of {asked} cannot be met: the most this plan can remove is "
                          f"{reach} ({limit_text}).")
    while lo < hi:
        mid = (lo + hi) // 2
        if removed_frac(cands[mid]) + 1e-12 >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and target - removed_frac(cands[lo - 1]) < removed_frac(cands[lo]) - target:
        lo -= 1
    return float(cands[lo]), counts_of(cands[lo])
