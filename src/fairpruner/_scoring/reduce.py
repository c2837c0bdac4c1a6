"""From what the pass recorded to per-unit scores: U (max class-pair W1 per site, combined over a group's sites),
R (first-order Taylor terms of the members' parameters) and the weights' L1 norm."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .._core.groups import GroupSpec, dense_reader, member_params, per_channel
from .._core.layers import CONV_TYPES
from .._errors import DataError, FairPrunerError
from .scores import GroupScores
from .taylor import TaylorTerms
from .sites import Site

__all__ = ["assemble", "consumer_norms", "U_REDUCTIONS", "R_REDUCTIONS", "U_CONSUMER_POWER"]

U_REDUCTIONS = ("max", "mean")
R_REDUCTIONS = ("sum", "max")
# Exponent on the consumers' weight norm U is multiplied by (chosen on a validation split of CIFAR-10
# training images, ResNet-20, 3 calibration seeds: see the README's accuracy section).
U_CONSUMER_POWER = 1.0


def consumer_norms(g: GroupSpec, modules: Dict[str, nn.Module]) -> Optional[torch.Tensor]:
    """Per root channel, the L2 norm of every Conv/Linear weight that reads it (their input slices, all
    readers together); None where the group has none (a unit family, or only depthwise, grouped or
    recurrent readers, whose input slices are not laid out like a Conv/Linear's)."""
    if g.family is not None:
        return None
    sq, found = torch.zeros(g.channels, dtype=torch.float64), False
    for m in g.members:
        mod = modules[m.module]
        if not dense_reader(m, mod):
            continue
        for p, dim in member_params(m, mod):
            if p.dim() > 1:
                sq += per_channel(p.detach().float().square(), dim, m).cpu().double()
                found = True
    return sq.sqrt() if found else None


def assemble(groups: List[GroupSpec], sites: List[Site], site_us: List[Optional[torch.Tensor]],
             modules: Dict[str, nn.Module], taylor: TaylorTerms, u_reduce: str, r_reduce: str,
             consumer_power: float = 0.0, outputs: Sequence[str] = ()) -> List[GroupScores]:
    """Per-group scores from each site's U (None: a tensor another site of the group measured) and the
    Taylor terms the pass accumulated. ``outputs`` names the model's output layers (a group they read feeds the
    head).

    With ``consumer_power`` p > 0, a unit's U is multiplied by ``consumer_norms ** p``: where a Linear or
    1x1 conv reads the measured tensor directly, the sliced W1 of the unit's contribution to its output is
    the unit's W1 times the L2 norm of the weights that read it (p = 1); elsewhere (a k x k conv, or a
    normalisation and activation in between) the norm is a proxy for it. U then measures the class
    separation the unit passes on, not only the one it carries.
    """
    by_group: Dict[int, List[torch.Tensor]] = {}
    for s, u in zip(sites, site_us):
        if u is not None:
            by_group.setdefault(s.group, []).append(u)
    out = []
    for gi, g in enumerate(groups):
        us = torch.stack(by_group[gi])
        # Each measured tensor is brought to a common scale (its mean U) before combining, then the
        # combination is put back on the average W1 scale; a single site keeps its raw W1 values.
        scale = us.mean(1, keepdim=True).clamp_min(1e-12)
        us = us / scale
        u = (us.amax(0) if u_reduce == "max" else us.mean(0)) * scale.mean()
        norms = consumer_norms(g, modules) if consumer_power else None
        if norms is not None:
            u = u.double() * norms.to(u.device).pow(consumer_power)
        terms = [taylor.term((gi, mi)) for mi, m in enumerate(g.members) if (gi, mi) in taylor.channels]
        if not bool(torch.stack([t.isfinite().all() for t in terms]).all()):
            raise DataError(f"Non-finite gradients in group '{g.name}'; check the loss and the model.")
        t = torch.stack(terms)
        # A unit family's members are the parts of one unit (an expert's layers and router row, a head's q, k
        # and v rows): their terms always add up. r_reduce chooses for coupled layers.
        r = t.sum(0).abs() if r_reduce == "sum" or g.family is not None else t.abs().amax(0)
        l1 = torch.zeros(g.channels, dtype=torch.float64)
        for m in g.members:
            if m.side == "out" and m.kind == "weight":
                for p, dim in member_params(m, modules[m.module]):
                    if p.dim() > 1:  # weights, not biases or norm scales
                        l1 += per_channel(p.detach().abs(), dim, m).cpu().double()
        uc = g.unit_channels
        chosen = g.family.units_from_scores(g, u, r) if g.family is not None else None
        if chosen is not None:
            if tuple(chosen.shape) != tuple(uc.shape):
                raise FairPrunerError(f"Family '{g.family.name}' chose units of shape {tuple(chosen.shape)} for group "
                                      f"'{g.name}', which has {tuple(uc.shape)}.")
            uc = chosen.long()
        out.append(GroupScores(g.name, u.cpu().double()[uc].mean(1).float(), r[uc].sum(1).float(),
                               l1[uc].sum(1).float(), g.channels, uc.clone(), _writers(g, modules),
                               any(m.module in outputs for m in g.members), g.max_removed))
    return out


def _writers(g: GroupSpec, modules: Dict[str, nn.Module]) -> int:
    """How many layers write a group's channels into a residual stream: the Conv/Linear layers producing them
    (a depthwise conv only rescales its input channels) when at least two layers read them; 1 otherwise. A
    gated MLP's gate and up projections write one product that one layer reads: not a stream."""
    if g.family is not None:
        return 1
    writers = sum(1 for m in g.members if m.side == "out" and m.kind == "weight"
                  and not (isinstance(modules[m.module], CONV_TYPES) and modules[m.module].groups > 1))
    readers = sum(1 for m in g.members if dense_reader(m, modules[m.module]))
    return writers if writers > 1 and readers > 1 else 1
