"""Where U is measured: the sites (tensors) of every group, their seeded directions, and the hooks that project
each measured tensor onto them as it is produced (memory: samples x units x projections, never feature maps)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .._core.groups import GroupSpec, Member, dense_reader
from .._core.inputs import first_sample
from .._core.layers import CONV_TYPES
from .._errors import DataError, FairPrunerError
from ..families.base import USource
from .budget import SiteSize
from .wasserstein import random_directions

__all__ = ["Site", "site_seed", "pick_sites", "attach_sites", "probe_batch_dims", "begin_forward", "U_SITES",
           "StopForward"]


class StopForward(BaseException):
    """Raised by the last site a forward-only pass waits for: nothing after it is needed. A BaseException, so
    that a model's own ``except Exception`` fallbacks never catch it."""

U_SITES = ("output", "norm", "input")


@dataclass
class Site:
    """A tensor on which U is measured: a module's output or input, channels mapped to root channels."""

    group: int
    module: str
    side: str          # "output" | "input"
    index: torch.Tensor  # (channels,) position in the tensor's channel dimension of each root channel
    seed: int
    directions: Optional[torch.Tensor] = None
    identity: bool = False  # index is 0..n-1 over all of the tensor's channels
    channels_last: bool = False  # channels are the last dimension of 3-D tensors
    batch_dim: int = 0  # 1 for sequence-first tensors (nn.MultiheadAttention/RNN layers with batch_first=False)
    chunks: List[torch.Tensor] = field(default_factory=list)
    labels: List[torch.Tensor] = field(default_factory=list)
    calls: int = -1  # the forward pass (state["forward"]) in which the site last recorded
    source: Optional[USource] = None  # a unit family's observation point (tensor arrives as (B, channels, ...))
    parent: int = -1  # the site this one is a slice of (its position in pick_sites' list); -1: itself
    lo: int = 0  # first unit of the slice
    raw: bool = False  # store maps unprojected (projected when U is computed)
    active: bool = True  # stores samples in the current pass

    @property
    def stored_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)


def site_seed(seed: int, module: str, side: str) -> int:
    """Seed of the random directions for one measured tensor: stable across runs, models and group order."""
    return (seed * 1_000_003 + zlib.crc32(f"{module}:{side}".encode())) % (2 ** 63)


def pick_sites(groups: List[GroupSpec], modules: Dict[str, nn.Module], u_at: str, seed: int,
               model: nn.Module, shared: Sequence[str] = ()) -> List[Site]:
    """The tensors U is measured on: per group, those of ``u_at``; where a group has none, or one of them
    belongs to a module in ``shared`` (run more than once per forward, so its tensor is ambiguous), the next
    kind in order (input -> norm -> output; output -> norm -> input; norm -> output). A group left with only
    shared modules keeps them, and scoring refuses it with a clear error."""
    sites = []
    for gi, g in enumerate(groups):
        if g.family is not None:
            for src in g.family.u_sources(model, g):
                sites.append(Site(gi, src.name, "output", torch.arange(g.channels),
                                   site_seed(seed, src.name, "family"), identity=True, source=src))
            continue
        producers = [m for m in g.members if m.side == "out" and m.kind == "weight"]
        norms = [m for m in g.members if m.side == "out" and m.kind == "norm"]
        consumers = [m for m in g.members if dense_reader(m, modules[m.module]) and m.index.shape[1] == 1]
        chosen = {"output": [producers, norms, consumers], "norm": [norms, producers],
                  "input": [consumers, norms, producers]}[u_at]
        members: List[Member] = next((c for c in chosen if c and not any(m.module in shared for m in c)),
                                     next((c for c in chosen if c), producers))
        for m in members:
            side = "input" if m.side == "in" else "output"
            sites.append(Site(gi, m.module, side, m.index[:, 0].clone(), site_seed(seed, m.module, side)))
    return sites


def _channel_width(mod: nn.Module, side: str) -> int:
    """Channels of a module's output ("output") or input ("input"); -1 where the module does not say."""
    if isinstance(mod, CONV_TYPES):
        return mod.out_channels if side == "output" else mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features if side == "output" else mod.in_features
    return int(getattr(mod, "num_features", getattr(mod, "num_channels", -1)))


def _site_hook(site: Site, state: dict, projections: int) -> Callable:
    def record(tensor: torch.Tensor) -> None:
        if state.get("probe") is not None:  # probe_batch_dims: shapes and identities only
            state["probe"][id(site)] = (tuple(tensor.shape), tensor.data_ptr())
            state["held"].append(tensor)  # no address is reused within the probe pass
            return
        if not site.active:
            return
        if site.calls == state["forward"]:
            raise FairPrunerError(f"Module '{site.module}' runs more than once per forward pass; shared modules "
                                  "cannot be scored. Add it to `ignore=`.")
        site.calls = state["forward"]
        # A tensor several sites of a group read is measured by the first only: probe_batch_dims makes the
        # others inactive.
        keep = state["keep"]  # may be empty: an empty chunk still records the layout (for torch.distributed)
        with torch.no_grad():
            x = tensor.detach()
            if site.batch_dim:
                x = x.movedim(site.batch_dim, 0)
            if keep.numel() != x.shape[0]:  # copies only when some samples of the batch are not needed
                x = x.index_select(0, keep)
            if x.dim() > 2 and site.channels_last:  # (B, T, C) tokens, (B, H, W, C) channels-last maps
                x = x.movedim(-1, 1)
            if not site.identity:  # the group's channels are a slice/permutation of this tensor's channels
                x = x.index_select(1, site.index.to(x.device))
            x = x.float()
            if x.dim() == 2:
                # Scalar unit outputs: exact 1-D W1. A copy, since an in-place activation may follow.
                proj = x.unsqueeze(-1).clone()  # (b, units, 1)
            else:
                flat = x.flatten(2)
                if site.directions is None:
                    g = torch.Generator().manual_seed(site.seed)
                    site.directions = random_directions(flat.shape[-1], projections, g).to(flat.device)
                # Raw: the map itself, projected by the same product when U is computed.
                proj = flat.contiguous().clone() if site.raw else flat @ site.directions  # (b, units, P|S)
            # NaN/inf anywhere in a kept sample survives the projection and its sum: one cheap reduction.
            if not bool(torch.isfinite(proj.sum())):
                raise DataError(f"Non-finite values (NaN/inf) in the {site.side} of '{site.module}'. Check the "
                                "model weights and the input normalisation.")
            site.chunks.append(proj.to(state["store_device"]))
            site.labels.append(state["labels"])
            state["meter"].add(proj.numel() * proj.element_size())
        if state.get("waiting") is not None:  # a forward-only pass: stop once its last site has its samples
            state["waiting"] -= 1
            if state["waiting"] == 0:
                raise StopForward
    if site.source is not None:
        return record
    if site.side == "output":
        return lambda mod, inp, out: record(out)
    return lambda mod, inp: record(inp[0])


def begin_forward(state: dict, keep: torch.Tensor, labels: torch.Tensor) -> None:
    """Tells the hooks which samples of the coming forward pass to keep, and their labels."""
    state["keep"], state["labels"] = keep, labels
    state["forward"] += 1


def attach_sites(sites: List[Site], modules: Dict[str, nn.Module], state: dict, projections: int) -> list:
    """Registers the hook of every site; returns the handles."""
    hooks = []
    for s in sites:
        if s.source is not None:
            hooks.extend(s.source.attach(modules, _site_hook(s, state, projections)))
            continue
        mod = modules[s.module]
        width = _channel_width(mod, s.side)
        s.identity = width == s.index.numel() and torch.equal(s.index, torch.arange(width))
        if s.side == "output":
            hooks.append(mod.register_forward_hook(_site_hook(s, state, projections)))
        else:
            hooks.append(mod.register_forward_pre_hook(_site_hook(s, state, projections)))
        s.channels_last = isinstance(mod, nn.Linear)  # Linear layers on (B, T, C) sequences
    return hooks


def probe_batch_dims(model: nn.Module, trace: tuple, sites: List[Site], state: dict,
                     projections: int) -> List[Optional[SiteSize]]:
    """Finds the batch dimension of every measured tensor (sequence-first layers put it second): the one that
    changes between forward passes on one and on two samples. Run with grad enabled, as the scoring passes
    are (no fused inference paths, such as nested tensors in nn.TransformerEncoder).

    Returns:
        per site, its store per kept sample; None for a site that reads the very tensor an earlier site of
        its group reads (a residual stream feeding a block and its shortcut): it is measured once.
    """
    one = first_sample(trace)
    two = tuple(torch.cat([t, t]) if torch.is_tensor(t) and t.dim() > 0 else t for t in one)
    shapes = []
    try:
        for x in (one, two):
            state["probe"], state["held"] = {}, []
            model(*x)
            shapes.append(state["probe"])
    finally:
        state["probe"], state["held"] = None, []
    for s in sites:
        a, b = shapes[0].get(id(s)), shapes[1].get(id(s))
        if s.source is None and a is not None and b is not None and len(a[0]) == len(b[0]):
            s.batch_dim = next((i for i, (p, q) in enumerate(zip(a[0], b[0])) if p != q), 0)
    seen = set()
    sizes: List[Optional[SiteSize]] = [None] * len(sites)
    position = {id(s): i for i, s in enumerate(sites)}
    for sid, (shape, ptr) in shapes[1].items():  # execution order
        s = sites[position[sid]]
        if (s.group, ptr, shape) in seen:
            continue
        seen.add((s.group, ptr, shape))
        sizes[position[sid]] = _site_size(s, shape, projections)
    return sizes


def _site_size(site: Site, shape: tuple, projections: int) -> SiteSize:
    dims = list(shape)
    dims.pop(site.batch_dim)
    if len(dims) == 1:
        return SiteSize(site.index.numel(), 1, 0)
    channel = len(dims) - 1 if site.channels_last else 0
    spatial = 1
    for i, d in enumerate(dims):
        spatial *= d if i != channel else 1
    return SiteSize(site.index.numel(), projections, spatial)
