"""Plans: which units of which group go, for an alpha or a params/MACs target, without re-scoring."""
from __future__ import annotations

import json
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .._errors import PlanError, TargetError
from .._scoring.scores import GroupScores, Scores
from .depths import (bisect_target, curves_of, group_weights, least_r_target, level_of, removal_limits,
                     uniform_counts)
from .options import (ALLOCATIONS, AUTO_FLOORS, AUTO_POWERS, AUTO_TARGETS, AUTO_WIDTH_POWERS, FLOORS, MACS_POWER,
                      SIGNALS, STREAM_FLOOR, STREAM_FLOORS, STREAM_WEIGHT, TIES, WIDTH_POWER, Signal, alpha_rules,
                      check_args, check_depth_options, fraction)
from .tod import rank_ascending, tod_counts

__all__ = ["Plan", "plan", "sweep", "SIGNALS", "ALLOCATIONS", "TIES", "STREAM_FLOORS", "STREAM_FLOOR", "FLOORS",
           "MACS_POWER", "WIDTH_POWER"]

PLAN_VERSION = 2  # 2: example_inputs may hold {"value": ...} between the tensors
MISS_WARNING = 0.005  # a plan further than this from its target (the half point promised) says so


@dataclass
class Plan:
    """Which units each group loses.

    Attributes:
        removed: group name -> sorted removed unit indices (every scored group is listed).
        alpha: the ToD level used (None for uniform allocation).
        groups: per group: ``name``, ``channels``, ``units`` and the root ``channels`` of each removed unit
            (``removed_channels``), everything :func:`fairpruner.prune` needs to replay the plan.
        settings: how the plan was made (signal, allocation, target, scoring settings).
        predicted: params/MACs before and after, from the cost model.
        example_inputs: shapes and dtypes of the inputs the model was traced with.
    """

    removed: Dict[str, List[int]]
    alpha: Optional[float]
    groups: List[Dict[str, Any]]
    settings: Dict[str, Any] = field(default_factory=dict)
    predicted: Dict[str, float] = field(default_factory=dict)
    example_inputs: List[Dict[str, Any]] = field(default_factory=list)

    def removed_channels(self, name: str) -> List[int]:
        """Sorted root channels removed from group ``name``."""
        for g in self.groups:
            if g["name"] == name:
                return list(g["removed_channels"])
        raise KeyError(name)

    @property
    def requested(self) -> Dict[str, float]:
        """The target asked for: ``{"alpha" | "params" | "macs": value}``."""
        return dict(self.settings.get("target", {}))

    @property
    def achieved(self) -> Dict[str, float]:
        """Fractions of parameters and MACs the plan removes (predicted exactly by the cost model)."""
        p = self.predicted
        if not p:
            return {}
        return {"params": 1 - p["params_after"] / max(p["params_before"], 1.0),
                "macs": 1 - p["macs_after"] / max(p["macs_before"], 1.0)}

    @property
    def units_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def units_total(self) -> int:
        return sum(g["units"] for g in self.groups)

    def to_json(self) -> str:
        """Versioned JSON that :meth:`from_json` reads back."""
        return json.dumps({"format": "fairpruner.plan", "version": PLAN_VERSION, "alpha": self.alpha,
                           "groups": [dict(g, removed=self.removed[g["name"]]) for g in self.groups],
                           "settings": self.settings, "predicted": self.predicted,
                           "example_inputs": self.example_inputs}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        if d.get("format") != "fairpruner.plan":
            raise PlanError("This JSON is not a fairpruner plan (write one with Plan.to_json).")
        if d["version"] > PLAN_VERSION:
            raise PlanError(f"Plan format {d['version']} is newer than this fairpruner understands; upgrade.")
        groups = [{k: v for k, v in g.items() if k != "removed"} for g in d["groups"]]
        removed = {g["name"]: list(g["removed"]) for g in d["groups"]}
        return cls(removed, d["alpha"], groups, d["settings"], d["predicted"], d["example_inputs"])


def _signal_values(g: GroupScores, signal: Signal, seed: int, index: int) -> torch.Tensor:
    if callable(signal):
        v = torch.as_tensor(signal(g)).flatten()
        if v.numel() != g.n_units:
            raise PlanError(f"The signal for group '{g.name}' has {v.numel()} values; it needs {g.n_units}.")
        return v
    if signal == "u":
        return g.u
    if signal == "l1":
        return g.l1
    if signal == "taylor":
        return g.r
    gen = torch.Generator().manual_seed(seed * 7919 + index)
    return torch.rand(g.n_units, generator=gen)


def plan(scores: Scores, alpha: Optional[float] = None, *, params: Optional[float] = None,
         macs: Optional[float] = None, signal: Signal = "u", allocation: str = "tod", seed: int = 0,
         stream_weight: float = STREAM_WEIGHT, ties: str = "r", stream_floor: str = STREAM_FLOOR,
         floor: str = "auto", macs_power: Union[str, float] = MACS_POWER,
         width_power: Union[str, float] = WIDTH_POWER) -> Plan:
    """Decides how many and which units every group loses.

    Give exactly one of ``alpha``, ``params`` or ``macs``.

    Args:
        scores: from :func:`fairpruner.score`.
        alpha: ToD level in [0, 1]: per group, the largest m <= floor(0.99 n) whose m lowest-U units share
            at most a fraction alpha with the m highest-R units.
        params: fraction of the whole model's parameters to remove, any value in [0, 1) up to what one round
            can remove. ToD's steps are taken in order of the level each needs (no re-scoring), so the plan
            is ``plan(alpha=a)`` wherever a level ends; steps of the same level (all of those below what
            ``alpha=0`` removes) go in the order ``ties`` gives. The plan lands within 0.4 pt of the target
            where the units' sizes allow, and warns when it misses by more than 0.5 pt.
        macs: the same for multiply-accumulates.
        signal: which units go once the count is fixed: "u" (lowest U-Score, the default), "l1" (lowest
            weight L1 norm), "taylor" (lowest R-Score), "random" (seeded), or a callable mapping a
            :class:`GroupScores` to one value per unit (lowest go).
        allocation: "tod" (per-group counts from Tolerance of Difference) or "uniform" (the same fraction of
            every group; needs ``params`` or ``macs``).
        seed: seeds the "random" signal.
        stream_weight: residual streams (groups several layers add into) are cut at ``alpha /
            stream_weight``: every block reads them. 1 treats them like any group.
        ties: for params/MACs targets with ToD allocation (no effect otherwise), the order among ToD steps
            of equal level: "r" (default) takes first the group whose next step has the lowest key: the
            largest R-Score among the m lowest-U units it would have removed, relative to the group's mean R,
            per param or MAC one unit holds; "u" keys on the m-th unit's relative U instead (the previous
            default; both order the steps whatever ``signal`` picks the units); "share" gives every group the
            same share of its alpha=0 count.
        stream_floor: how much of a residual stream's alpha=0 count is free. That count is a first-collision
            statistic that swings with the calibration sample, and every block reads a stream's units.
            "shallow" (default): none of the stream the output layer reads (the head's features) nor of a
            stream more than 4 layers write (every block adds into it and reads it: ResNet-56's, with 10), and
            at most floor(sqrt(n)) and at most n / 8 of another stream's n units: what two independent rankings
            give by chance, less where the stream is narrow (ResNet-20's 4-writer streams: 2 of 16 and 4 of 32);
            the rest at the stream's first positive level. "writers": the same, but a stream of more than 4
            writers keeps floor(sqrt(4 n / writers)) free (ResNet-56's: 2 of 16 and 3 of 32 units; the previous
            default). "capped": floor(sqrt(n)) whatever the writers and width. "sqrt": at most floor(sqrt(n))
            of every stream, the head's too. "free": all of it (the paper's ToD). "none": a stream loses units
            only at positive levels.
        floor: the same for every other group. "free": all of it (the paper's ToD). "sqrt": at most
            floor(sqrt(n)) of its alpha=0 count is free, the rest costs the group's first positive level, so
            a light target does not take a small layer's chance-long floor whole (VGG-16-BN's first
            convolution: 19 of 64 channels at alpha 0; +0.4 pt there at 20 % MACs on validation, -0.8 pt on
            ResNet-56). "none": only positive levels. "auto" (default): for a params or MACs target, "free"
            or "sqrt", chosen with ``macs_power`` by the least total R-Score; "free" for an alpha.
            ``plan.settings["floor_used"]`` says which.
        macs_power: every group's ToD levels are multiplied by (the MACs one of its units holds / the
            geometric mean over all units) ** macs_power, as residual streams' are by ``stream_weight``: a
            positive value cuts layers of cheap units (wide, low-resolution) deeper than layers whose every
            unit holds many MACs. 0: one level for every layer (the paper). "auto" (default): for a params or
            MACs target, whichever of 0, -0.25 and 0.25 gives the plan whose removed units have the least total
            R-Score (the first-order loss estimate; milliseconds, no data); 0 for an alpha, where plans of
            different sizes cannot be compared. ``plan.settings["macs_power_used"]`` says which.
        width_power: every group's ToD levels are also multiplied by (its units / the geometric mean width)
            ** -width_power: a positive value cuts wide layers deeper than narrow ones. 0: no width weighting.
            "auto" (default): for a MACs target, 0 or 1, chosen with ``floor`` and ``macs_power`` by the least
            total R-Score; 0 for a params target or an alpha. ``plan.settings["width_power_used"]`` says which.

    Returns:
        A :class:`Plan`; ``plan.requested`` and ``plan.achieved`` say what was asked and what it removes.

    Raises:
        PlanError: for bad arguments.
        TargetError: (a PlanError) for a target beyond what one round can remove; the message names the
            largest reachable one.

    Example:
        >>> scores = fp.score(model, calib)
        >>> p = fp.plan(scores, macs=0.5)            # or alpha=0.05, or params=0.3
        >>> p.requested, p.achieved
        ({'macs': 0.5}, {'params': ..., 'macs': 0.50...})
    """
    key, value = check_args(alpha, params, macs, signal, allocation, stream_weight, ties, stream_floor, floor,
                            macs_power, seed, width_power)
    seed = int(seed)
    macs_power = macs_power if macs_power == "auto" else float(macs_power)
    width_power = width_power if width_power == "auto" else float(width_power)
    units = np.array([g.n_units for g in scores.groups])
    cost = scores.cost
    before = cost.evaluate(np.zeros(len(units)))
    floor_used, power, width_used = alpha_rules(floor, macs_power, width_power)
    # Each group's removal order, computed once: the plan takes its lowest ranks, and "auto" prices them.
    ranks = [rank_ascending(_signal_values(g, signal, seed, i)) for i, g in enumerate(scores.groups)]
    chosen: Optional[float] = None
    if key != "alpha" and value == 0:
        counts = np.zeros(len(units), dtype=np.int64)
    elif allocation == "tod" and key == "alpha":
        chosen = value
        counts = tod_counts(curves_of(scores, stream_floor, floor_used), value,
                            group_weights(scores, stream_weight, power, width_used))
    elif allocation == "tod":
        floors = AUTO_FLOORS if floor == "auto" else (floor,)
        curve_sets = {f: curves_of(scores, stream_floor, f) for f in floors}
        powers = AUTO_POWERS if macs_power == "auto" else (power,)
        widths = AUTO_WIDTH_POWERS if width_power == "auto" and key in AUTO_TARGETS["width_power"] else (width_used,)
        floor_used, power, width_used, counts = least_r_target(
            scores, curve_sets, [(f, p, w) for w in widths for f in floors for p in powers], stream_weight, key,
            value, before, ties, ranks)
        chosen = level_of(curve_sets[floor_used], counts, group_weights(scores, stream_weight, power, width_used))
    else:
        cands = np.unique(np.concatenate([np.arange(n + 1) / n for n in units]))
        limits = removal_limits(scores)
        _, counts = bisect_target(cands, lambda f: uniform_counts(units, f, limits), cost, key, value, before,
                                  "removing 99% of every group (fewer where a group must keep more)")
    result = _make_plan(scores, counts, ranks, signal, seed, chosen, before,
                        {"allocation": allocation, "target": {key: value}, "stream_weight": stream_weight,
                         "ties": ties, "stream_floor": stream_floor, "floor": floor, "floor_used": floor_used,
                         "macs_power": macs_power, "macs_power_used": power, "width_power": width_power,
                         "width_power_used": width_used})
    if key != "alpha" and abs(result.achieved[key] - value) > MISS_WARNING:
        warnings.warn(f"The plan removes {result.achieved[key]:.1%} of the {key} (asked {value:.1%}): the "
                      "planner found no closer plan (the units are large against the model).", stacklevel=2)
    return result


def _make_plan(scores: Scores, counts: np.ndarray, ranks: Sequence[np.ndarray], signal: Signal, seed: int,
               alpha: Optional[float], before: Dict[str, float], how: Dict[str, Any]) -> Plan:
    """The plan removing ``counts[g]`` units of each group, those of the lowest ``ranks`` (of ``signal``)."""
    removed, groups = {}, []
    for g, m, order in zip(scores.groups, counts, ranks):
        gone = sorted(int(k) for k in np.nonzero(order < m)[0])
        removed[g.name] = gone
        chans = sorted(int(c) for c in g.unit_channels[gone].flatten()) if gone else []
        groups.append({"name": g.name, "channels": g.channels, "units": g.n_units,
                       "unit_size": int(g.unit_channels.shape[1]), "removed_channels": chans})
    after = scores.cost.evaluate(counts)
    predicted = {"params_before": before["params"], "params_after": after["params"],
                 "macs_before": before["macs"], "macs_after": after["macs"]}
    name = signal if isinstance(signal, str) else getattr(signal, "__name__", "custom")
    settings = {"model_signature": scores.meta.get("model_signature"), "signal": name, **how,
                "seed": seed, "scoring": _scoring_record(scores.meta)}
    settings["achieved"] = {k: 1 - after[k] / max(before[k], 1.0) for k in ("params", "macs")}
    return Plan(removed, None if alpha is None else float(alpha), groups, settings, predicted,
                list(scores.meta.get("example_inputs", [])))


def _scoring_record(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The scores' settings a plan records: without the memory the U store was given and used, which depend
    on the machine (the default budget is a share of its free memory) and change nothing in the scores, so
    that the same scores give the same plan file anywhere."""
    store = meta.get("u_store")
    return meta if store is None else {**meta, "u_store": {"class_pairs": store.get("class_pairs")}}


def sweep(scores: Scores, alphas: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), *,
          params: Optional[Sequence[float]] = None, macs: Optional[Sequence[float]] = None,
          stream_weight: float = STREAM_WEIGHT, ties: str = "r",
          stream_floor: str = STREAM_FLOOR, floor: str = "auto",
          macs_power: Union[str, float] = MACS_POWER,
          width_power: Union[str, float] = WIDTH_POWER) -> List[Dict[str, float]]:
    """Predicted units/params/MACs removed for each alpha, or for each params/MACs target, from one set of
    scores (milliseconds).

    Args:
        scores: from :func:`fairpruner.score`.
        alphas: ToD levels (used when neither ``params`` nor ``macs`` is given).
        params: fractions of parameters to remove; each row then holds the ``target`` asked beside what the
            plan removes, or, for a target beyond one round, ``"refused"`` with the reason (the other targets
            are still planned).
        macs: the same for MACs.
        stream_weight: as in :func:`plan`.
        ties: as in :func:`plan` (targets only).
        stream_floor: as in :func:`plan`.
        floor: as in :func:`plan`.
        macs_power: as in :func:`plan`.
        width_power: as in :func:`plan`.

    Example:
        >>> print(fp.format_sweep(fp.sweep(scores, macs=[0.1, 0.2, 0.35, 0.5])))
    """
    if params is not None and macs is not None:
        raise PlanError("Give params= or macs= targets to sweep, not both.")
    if params is not None or macs is not None:
        key, values = ("params", params) if params is not None else ("macs", macs)
        options = {"stream_weight": stream_weight, "ties": ties, "stream_floor": stream_floor, "floor": floor,
                   "macs_power": macs_power, "width_power": width_power}
        return [_target_row(scores, options, key, fraction(key, v)) for v in _listed(values)]
    check_depth_options(stream_weight, stream_floor, floor, macs_power, width_power)
    floor_used, power, width_used = alpha_rules(floor, macs_power, width_power)
    curves = curves_of(scores, stream_floor, floor_used)
    weights = group_weights(scores, stream_weight, power, width_used)
    before = scores.cost.evaluate(np.zeros(len(curves)))
    total = sum(g.n_units for g in scores.groups)
    rows = []
    for a in _listed(alphas):
        a = fraction("alpha", a)
        counts = tod_counts(curves, a, weights)
        after = scores.cost.evaluate(counts)
        rows.append({"alpha": a, "units_removed": int(counts.sum()) / max(total, 1),
                     "params_removed": 1 - after["params"] / before["params"],
                     "macs_removed": 1 - after["macs"] / before["macs"]})
    return rows


def _listed(values: Any) -> list:
    """A sweep's values; one number is a list of one."""
    return [values] if isinstance(values, numbers.Real) else list(values)


def _target_row(scores: Scores, options: Dict[str, Any], key: str, value: float) -> Dict[str, Any]:
    try:
        p = plan(scores, **options, **{key: value})
    except TargetError as exc:  # one target out of reach does not hide the others
        return {"target_key": key, "target": value, "refused": str(exc)}
    total = sum(g.n_units for g in scores.groups)
    return {"target_key": key, "target": p.requested[key], "alpha": p.alpha,
            "units_removed": p.units_removed / max(total, 1), "params_removed": p.achieved["params"],
            "macs_removed": p.achieved["macs"]}
