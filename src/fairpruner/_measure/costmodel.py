"""Exact parameter and MAC counts of a pruned model, predicted from the number of units each group loses.

Every parameter tensor and every Conv/Linear MAC count scales with the kept fraction of at most two axes
(output and input channels); an axis shrinks by a fixed number of positions per removed unit of each group
that touches it (several groups feed one axis after a concatenation). So a plan's cost is a handful of
numpy operations, which lets a params/MACs target be met by bisection in milliseconds.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from .._core.groups import GroupSpec, dim_size
from .._core.layers import CONV_TYPES, WEIGHT_TYPES
from .counting import count_params, module_macs

__all__ = ["CostModel"]


class CostModel:
    """Predicts params and MACs after removing ``removed[g]`` units from each group ``g``."""

    def __init__(self, axis_total: np.ndarray, axis_per_unit: np.ndarray, terms: np.ndarray,
                 const_params: float, const_macs: float) -> None:
        self.axis_total = np.asarray(axis_total, dtype=np.float64)        # (A,)
        self.axis_per_unit = np.asarray(axis_per_unit, dtype=np.float64)  # (A, G)
        self.terms = np.asarray(terms, dtype=np.float64).reshape(-1, 4)   # (count, axis0, axis1, is_macs)
        self.const_params = float(const_params)
        self.const_macs = float(const_macs)

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, groups: Sequence[GroupSpec]) -> "CostModel":
        """The cost model of ``model`` for ``groups`` (unit-family groups add their family's MACs terms)."""
        axes = _Axes(groups, dict(model.named_modules()))
        total_macs, macs = module_macs(model, example_inputs)
        terms, counted_params, counted_macs = axes.layer_terms(macs)
        x = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        for g in groups:
            if g.family is None:
                continue
            for count, k0, k1 in g.family.macs_terms(model, x, g):
                terms.append((count, axes.index.get(k0, -1) if k0 else -1, axes.index.get(k1, -1) if k1 else -1, 1))
                counted_macs += count
        return cls(axes.totals(), axes.matrix(len(groups)), np.array(terms, dtype=np.float64).reshape(-1, 4),
                   count_params(model) - counted_params, total_macs - counted_macs)

    def evaluate(self, removed_units: np.ndarray) -> Dict[str, float]:
        """Params and MACs after removing ``removed_units[g]`` units from group ``g``."""
        removed_units = np.asarray(removed_units, dtype=np.float64)
        keep = 1.0 - (self.axis_per_unit @ removed_units) / np.maximum(self.axis_total, 1.0)
        keep = np.append(keep, 1.0)  # index -1: untouched axis
        count, a0, a1, is_macs = self.terms.T
        scaled = count * keep[a0.astype(int)] * keep[a1.astype(int)]
        macs = scaled[is_macs == 1].sum() + self.const_macs
        params = scaled[is_macs == 0].sum() + self.const_params
        return {"params": float(round(params)), "macs": float(round(macs))}

    def unit_cost(self) -> Dict[str, np.ndarray]:
        """Params and MACs one unit of each group holds, at the unpruned model (the cost's derivative): a
        term ``count * keep[a0] * keep[a1]`` loses ``count * (d0 + d1)`` per unit, ``d`` the unit's share of
        each axis."""
        share = self.axis_per_unit / np.maximum(self.axis_total, 1.0)[:, None]  # (A, G)
        share = np.vstack([share, np.zeros((1, share.shape[1]))])  # index -1: untouched axis
        count, a0, a1, is_macs = self.terms.T
        per_term = count[:, None] * (share[a0.astype(int)] + share[a1.astype(int)])  # (T, G)
        return {"params": per_term[is_macs == 0].sum(0), "macs": per_term[is_macs == 1].sum(0)}

    def to_dict(self) -> Dict[str, torch.Tensor]:
        return {"axis_total": torch.from_numpy(self.axis_total), "axis_per_unit": torch.from_numpy(self.axis_per_unit),
                "terms": torch.from_numpy(self.terms),
                "consts": torch.tensor([self.const_params, self.const_macs], dtype=torch.float64)}

    @classmethod
    def from_dict(cls, d: Dict[str, torch.Tensor]) -> "CostModel":
        return cls(d["axis_total"].numpy(), d["axis_per_unit"].numpy(), d["terms"].numpy(),
                   float(d["consts"][0]), float(d["consts"][1]))


class _Axes:
    """The channel axes the groups cut: each (module, out | in) or explicit (module, param, dim), with the
    positions one removed unit of each group takes from it."""

    def __init__(self, groups: Sequence[GroupSpec], modules: Dict[str, nn.Module]) -> None:
        self.modules = modules
        self.index: Dict[tuple, int] = {}
        self.per_unit: List[Dict[int, float]] = []
        self.unit_axes: Dict[str, int] = {}    # module owned by one unit -> its group's units axis
        self.unit_totals: Dict[int, int] = {}  # units axis -> the group's channels
        self.explicit: Dict[tuple, List[int]] = {}  # (module, param) -> its explicit axes
        for g_idx, g in enumerate(groups):
            for mem in g.members:
                m = modules[mem.module]
                if mem.side == "in" and isinstance(m, CONV_TYPES) and m.groups == m.in_channels > 1:
                    continue  # depthwise: its input axis is its output axis, counted once
                if mem.owner is not None:
                    # A module owned by one unit (an expert's layer): its parameters scale with the kept units.
                    a = self._axis(("units", g.name))
                    self.per_unit[a][g_idx] = float(g.unit_size)
                    self.unit_axes[mem.module], self.unit_totals[a] = a, g.channels
                    continue
                # Explicit parameter layouts (gate blocks, fused projections) get one axis per (param, dim).
                keys = [(mem.module, n, d) for n, d in mem.params] if mem.params is not None else \
                    [(mem.module, 0 if mem.side == "out" else 1)]
                for key in keys:
                    a = self._axis(key)
                    self.per_unit[a][g_idx] = self.per_unit[a].get(g_idx, 0.0) + mem.index.shape[1] * g.unit_size
                    if len(key) == 3 and a not in self.explicit.setdefault(key[:2], []):
                        self.explicit[key[:2]].append(a)

    def _axis(self, key: tuple) -> int:
        a = self.index.setdefault(key, len(self.index))
        if a == len(self.per_unit):
            self.per_unit.append({})
        return a

    def totals(self) -> np.ndarray:
        out = np.zeros(len(self.index))
        for key, a in self.index.items():
            if a in self.unit_totals:
                out[a] = self.unit_totals[a]
                continue
            m = self.modules[key[0]]
            out[a] = _axis_size(m, key[1]) if len(key) == 2 else dim_size(getattr(m, key[1]), key[2])
        return out

    def matrix(self, n_groups: int) -> np.ndarray:
        A = np.zeros((len(self.index), n_groups))
        for a, d in enumerate(self.per_unit):
            for g_idx, v in d.items():
                A[a, g_idx] = v
        return A

    def layer_terms(self, macs: Dict[str, int]) -> tuple:
        """(count, axis, axis, is_macs) of every parameter tensor and every layer's MACs, and their sums."""
        terms, counted_params, counted_macs = [], 0, 0
        axes = self.index
        first_dim = {a: k[2] if isinstance(k[2], int) else k[2][0] for k, a in axes.items() if len(k) == 3}
        for mname, m in self.modules.items():
            a0, a1 = axes.get((mname, 0), -1), axes.get((mname, 1), -1)
            for pname, p in m.named_parameters(recurse=False):
                explicit = sorted(self.explicit.get((mname, pname), []), key=first_dim.__getitem__)
                if mname in self.unit_axes:  # plus the one other axis a group may cut (e.g. the layer's inputs)
                    other = a1 if pname == "weight" and isinstance(m, WEIGHT_TYPES) and a1 >= 0 else a0
                    terms.append((p.numel(), self.unit_axes[mname], other, 0))
                elif explicit:
                    terms.append((p.numel(), explicit[0], explicit[1] if len(explicit) > 1 else -1, 0))
                elif pname == "weight" and isinstance(m, WEIGHT_TYPES):
                    terms.append((p.numel(), a0, a1, 0))
                else:
                    terms.append((p.numel(), a0, -1, 0))
                counted_params += p.numel()
            if isinstance(m, WEIGHT_TYPES) and mname in macs:
                terms.append((macs[mname], a0, a1, 1))
                counted_macs += macs[mname]
            elif isinstance(m, nn.RNNBase) and mname in macs:
                # Recurrent layers count steps x the size of each weight matrix (counting.rnn_macs); each term
                # scales with the explicit axes of its weight (gate rows, recurrent and input columns).
                weights = [(n, p) for n, p in m.named_parameters(recurse=False) if n.startswith("weight_")]
                steps = macs[mname] // max(sum(p.numel() for _, p in weights), 1)
                for n, p in weights:
                    terms.append((steps * p.numel(), axes.get((mname, n, 0), -1), axes.get((mname, n, 1), -1), 1))
                counted_macs += macs[mname]
        return terms, counted_params, counted_macs


def _axis_size(m: nn.Module, side: str) -> int:
    if isinstance(m, CONV_TYPES):
        return m.out_channels if side == 0 else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if side == 0 else m.in_features
    w = getattr(m, "weight", None)
    if w is not None:
        return w.shape[0]
    return int(getattr(m, "num_features", getattr(m, "num_channels", 1)))
