"""The data model every stage shares: a coupled group of channels (:class:`GroupSpec`) and the modules it
touches (:class:`Member`), with the few operations on them that need no graph and no scores.

A *group* is a set of channels that must be removed together (a conv with its BatchNorm and its consumers,
all writers of a residual stream, the slices of a concatenation, an attention head). Its *root* is the first
layer whose output channels belong to it; the group is named after the root and its channels are numbered in
the root's output-channel space. A *unit* is the smallest removable block of root channels: one channel, or a
whole GroupNorm group where GroupNorm couples channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .layers import CONV_TYPES, NORM_TYPES, WEIGHT_TYPES

__all__ = ["Member", "GroupSpec", "MacsTerm", "member_params", "member_kind", "dense_reader", "zero_members_",
           "per_channel", "dim_size", "fill_positions_"]

# (macs, axis key, axis key): MACs of one sample that scale with the kept fraction of up to two axes. An axis
# key is ``(module, param, dim)`` for members with explicit params, else ``(module, 0 | 1)`` (out | in).
MacsTerm = Tuple[float, Optional[tuple], Optional[tuple]]


@dataclass
class Member:
    """One module touched when the group's channels go.

    Attributes:
        module: qualified module name.
        side: "out" (the module's output channels/features) or "in" (its input channels/features).
        index: LongTensor (channels, k): for root channel c, the k positions in this module's channel
            dimension that go with it (k > 1 after a flatten, where one channel feeds k features).
        kind: "weight" (Conv/Linear, or a family's weight tensors that produce the unit: their L1 is the
            unit's), "norm" or "other".
        params: explicit ``(parameter name, dim)`` pairs the index addresses, for layers whose parameters are
            not laid out like Conv/Linear (recurrent gate blocks, fused attention projections). None: every
            own parameter along dim 0 for "out", the weight's dim 1 for "in". ``dim`` may be a pair of dims
            ``(d0, d1)``: positions then number their product row-major, ``i * size(d1) + j`` (experts stacked
            on ``d0``, each expert's hidden units on ``d1``).
        owner: set for a module that belongs wholly to one root channel (a layer of one expert): every
            parameter of it goes with root channel ``owner``, ``index`` is ``(channels, 0)``. The cost model
            scales such parameters with the group's kept units (exact when the owned modules of the group are
            alike in size); their MACs stay constant unless the family lists MACs terms.
    """

    module: str
    side: str
    index: torch.Tensor
    kind: str
    params: Optional[Tuple[Tuple[str, Any], ...]] = None
    owner: Optional[int] = None


@dataclass
class GroupSpec:
    """A coupled group of channels, as found in the model."""

    name: str
    channels: int
    unit_channels: torch.Tensor  # (units, unit_size): root channels of each unit
    members: List[Member] = field(default_factory=list)
    family: Any = None  # None: a torch-pruning group; else the Family instance that owns it
    # Most units one plan may remove, where the model needs more to remain than ToD's 1 % (an MoE block keeps
    # top_k experts); None: 99 % of them.
    max_removed: Optional[int] = None

    @property
    def n_units(self) -> int:
        return int(self.unit_channels.shape[0])

    @property
    def unit_size(self) -> int:
        return int(self.unit_channels.shape[1])

    def channels_of(self, units: Iterable[int]) -> List[int]:
        """Sorted root channels of the given units."""
        units = list(units)
        if not units:
            return []
        return sorted(int(c) for c in self.unit_channels[torch.tensor(units, dtype=torch.long)].flatten())


def member_kind(module: nn.Module) -> str:
    """"weight" (Conv/Linear), "norm" (a normalisation layer) or "other"."""
    if isinstance(module, WEIGHT_TYPES):
        return "weight"
    if isinstance(module, NORM_TYPES):
        return "norm"
    return "other"


def dense_reader(member: Member, module: nn.Module) -> bool:
    """True for a Conv/Linear reading the group's channels through input slices of its own weight (not a
    depthwise or grouped conv, whose input channels are laid out per group of its outputs)."""
    return member.side == "in" and member.kind == "weight" and \
        not (isinstance(module, CONV_TYPES) and module.groups > 1)


def member_params(member: Member, module: nn.Module) -> List[tuple]:
    """``(parameter, dim)`` pairs a member's index addresses (see :class:`Member`)."""
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        return []  # one slope shared by every channel: nothing of it belongs to a channel
    if member.params is not None:
        return [(own[n], d) for n, d in member.params if n in own]
    if member.side == "out":
        return [(p, 0) for p in own.values()]
    w = own.get("weight")
    return [(w, 1)] if w is not None and w.dim() > 1 else []


Dim = Union[int, Tuple[int, int]]


def dim_size(t: torch.Tensor, dim: Dim) -> int:
    """Positions along ``dim`` (a dim, or a pair of dims numbered row-major: see :class:`Member`)."""
    return t.shape[dim[0]] * t.shape[dim[1]] if isinstance(dim, tuple) else t.shape[dim]


def per_channel(t: torch.Tensor, dim: Dim, member: Member) -> torch.Tensor:
    """Sums ``t`` over every dimension but ``dim``, then over each root channel's positions in ``dim``."""
    if member.owner is not None:  # the whole tensor belongs to one root channel (an expert's layer)
        out = t.new_zeros(member.index.shape[0])
        out[member.owner] = t.sum()
        return out
    if isinstance(dim, tuple):
        t = t.movedim(dim, (0, 1)).flatten(0, 1)
        dim = 0
    t = t.movedim(dim, 0).flatten(1).sum(1) if t.dim() > 1 else t
    return t.index_select(0, member.index.flatten().to(t.device)).view_as(member.index).sum(1)


def fill_positions_(p: torch.Tensor, dim: Dim, pos: torch.Tensor, value: float = 0.0) -> None:
    """Sets ``p``'s slices at positions ``pos`` of ``dim`` to ``value``, in place."""
    pos = pos.to(p.device)
    if not isinstance(dim, tuple):
        p.index_fill_(dim, pos, value)
        return
    inner = p.shape[dim[1]]
    p.movedim(dim, (0, 1))[pos // inner, pos % inner] = value  # a view of p: written in place


def zero_members_(model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
    """Zeroes the parameter slices of every member of ``group`` that belong to root ``channels``."""
    modules = dict(model.named_modules())
    chans = torch.tensor(sorted(channels), dtype=torch.long)
    with torch.no_grad():
        for mem in group.members:
            mod = modules[mem.module]
            if mem.params is None and mem.side == "in" and isinstance(mod, CONV_TYPES) and mod.groups > 1:
                continue  # depthwise: its input channels are its output channels
            if mem.owner is not None:  # a module that belongs wholly to one root channel
                if mem.owner in channels:
                    for p, _ in member_params(mem, mod):
                        p.zero_()
                continue
            pos = mem.index.index_select(0, chans).flatten()
            for p, dim in member_params(mem, mod):
                fill_positions_(p, dim, pos)
