"""Gated MLPs whose gate and up projections are fused in one Linear (Phi-3's ``gate_up_proj``): hidden units as
a unit family.

A module with Linear ``gate_up_proj`` (``2 * I`` outputs, split in two halves by ``chunk(2, dim=-1)``: gate,
then up) and Linear ``down_proj`` (``I`` inputs) computes ``down(act(gate) * up)``. Hidden unit ``j`` owns rows
``j`` and ``I + j`` of ``gate_up_proj`` and column ``j`` of ``down_proj``; torch-pruning cannot express this
(its chunk maps ``down_proj`` to half of the channels), so the family lays it out. The surgery keeps the two
halves contiguous (kept gate rows, then the same up rows), so ``chunk(2)`` still splits them right. U is read on
``gate_up_proj``'s output (both rows of each unit), as for a gated MLP's two projections.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import torch
from torch import nn

from .._core.groups import GroupSpec, Member
from .._core.layers import kept, qualname, slice_linear_
from .._errors import PlanError
from .base import Family, USource, hook_source, register

__all__ = ["FusedGatedMLP", "fused_mlps"]


def fused_mlps(model: nn.Module) -> List[str]:
    """Names of the modules with a fused ``gate_up_proj`` and a ``down_proj`` reading its halves' product."""
    out = []
    for name, m in model.named_modules():
        up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == 2 * down.in_features:
            out.append(name)
    return out


@register
class FusedGatedMLP(Family):
    """Hidden units of gated MLPs with a fused gate/up projection (see the module docstring)."""

    name = "fused_gated_mlp"

    def owned(self, model: nn.Module) -> List[str]:
        return [qualname(n, c) for n in fused_mlps(model) for c in ("gate_up_proj", "down_proj")]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        groups = []
        for name in fused_mlps(model):
            up, down = qualname(name, "gate_up_proj"), qualname(name, "down_proj")
            width = model.get_submodule(down).in_features
            if width < 2 or any(n in ignore for n in (name, up, down)):
                continue
            j = torch.arange(width)
            members = [Member(up, "out", torch.stack([j, j + width], 1), "weight"),
                       Member(down, "in", j.view(-1, 1), "weight")]
            groups.append(GroupSpec(f"{name}:units", width, j.view(-1, 1), members, family=self))
        return groups

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        up = group.members[0]
        return [hook_source(group.name, up.module, side="output", index=up.index, channels_last=True)]

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        up, down = (model.get_submodule(m.module) for m in group.members)
        if down.in_features != group.channels:
            raise PlanError(f"'{group.name}' has {down.in_features} units, the plan expects {group.channels}. Apply "
                            "a plan to an unpruned instance of the architecture it was made for.")
        keep = kept(group.channels, torch.tensor(channels, dtype=torch.long))
        slice_linear_(up, 0, torch.cat([keep, keep + group.channels]))  # [gate kept | up kept]
        slice_linear_(down, 1, keep)
