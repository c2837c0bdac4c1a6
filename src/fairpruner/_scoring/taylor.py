"""The R-Score's raw material: per group and output-side member, the signed first-order Taylor terms
``sum_b dL_b/dw * w`` of every root channel, accumulated while the backward pass runs.

Each parameter's gradient is reduced to those per-channel terms the moment autograd has accumulated it, and then
freed (a post-accumulate-grad hook), so the scoring pass never holds a model-sized set of gradients (3.9 GB for
a 1 B-parameter model). The terms are linear in the gradient, so summing them batch by batch equals reducing the
accumulated gradient, up to float rounding.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member, member_params

__all__ = ["TaylorTerms", "per_channel"]

Key = Tuple[int, int]  # (group index, member index)


def per_channel(t: torch.Tensor, dim: int, member: Member) -> torch.Tensor:
    """Sums ``t`` over every dimension but ``dim``, then over each root channel's positions in ``dim``."""
    if member.owner is not None:  # the whole tensor belongs to one root channel (an expert's layer)
        out = t.new_zeros(member.index.shape[0])
        out[member.owner] = t.sum()
        return out
    t = t.movedim(dim, 0).flatten(1).sum(1) if t.dim() > 1 else t
    return t.index_select(0, member.index.flatten().to(t.device)).view_as(member.index).sum(1)


class TaylorTerms:
    """Accumulates the Taylor terms of every output-side member with parameters, freeing gradients as they come.

    Args:
        groups: the scored groups; ``modules``: the scored model's modules by name.
    """

    def __init__(self, groups: Sequence[GroupSpec], modules: Dict[str, nn.Module]) -> None:
        self.readers: Dict[int, List[Tuple[Key, int, Member]]] = {}
        self.channels: Dict[Key, int] = {}
        for gi, g in enumerate(groups):
            for mi, m in enumerate(g.members):
                params = member_params(m, modules[m.module]) if m.side == "out" else []
                if params:
                    self.channels[(gi, mi)] = int(m.index.shape[0])
                for p, dim in params:
                    self.readers.setdefault(id(p), []).append(((gi, mi), dim, m))
        self.terms: Dict[Key, torch.Tensor] = {}

    def attach(self, model: nn.Module) -> List[Any]:
        """Hooks on every parameter of ``model`` (a parameter no member reads only has its gradient freed)."""
        return [p.register_post_accumulate_grad_hook(self._arrived) for p in model.parameters() if p.requires_grad]

    def _arrived(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            for key, dim, m in self.readers.get(id(p), ()):
                t = per_channel(p.grad * p, dim, m).double()
                self.terms[key] = t if key not in self.terms else self.terms[key] + t
        p.grad = None

    def keys(self) -> List[Key]:
        return sorted(self.channels)

    def term(self, key: Key) -> torch.Tensor:
        """The accumulated terms of one member (zeros where none of its parameters got a gradient)."""
        got = self.terms.get(key)
        return got.cpu() if got is not None else torch.zeros(self.channels[key], dtype=torch.float64)
