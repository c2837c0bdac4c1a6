"""torch.distributed: gradients and sample counts are summed on every rank; each site slice's kept samples go to
one owner rank (a gather to that rank, not a gather to all), which computes its U; the U vectors are then
broadcast, so every rank returns the same scores while holding about 1/N of the sample store."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from .._errors import FairPrunerError
from .budget import StoreMeter
from .labels import first_per_class
from .sites import Site

__all__ = ["distributed", "merge_totals", "to_owners", "share_u", "agreed"]


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm() -> torch.device:
    dist = torch.distributed
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agreed(step: Callable[[], Any]) -> Any:
    """Runs ``step`` on every rank; if it fails on any rank, every rank raises (the failing one its own error),
    so that no rank waits forever in the collectives that follow."""
    if not distributed():
        return step()
    error, result = None, None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    flag = torch.tensor([0 if error is None else 1], device=_comm())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag):
        raise FairPrunerError("Scoring failed on another rank (see its error); every rank stops.")
    return result


def merge_totals(taylor: Any, seen: torch.Tensor, n_samples: int) -> tuple:
    """Sums the Taylor terms (a :class:`~fairpruner._scoring.taylor.TaylorTerms`), the samples seen per class and
    in all over the ranks."""
    dist = torch.distributed
    comm = _comm()
    keys = taylor.keys()  # every rank has the same groups, so the same keys in the same order
    terms = [taylor.term(k) for k in keys]
    flat = torch.cat([t.flatten() for t in terms]).to(comm)
    dist.all_reduce(flat)
    offset = 0
    for k, t in zip(keys, terms):
        taylor.set_term(k, flat[offset:offset + t.numel()].cpu())
        offset += t.numel()
    width = torch.tensor([seen.numel()], device=comm)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    seen = torch.cat([seen, torch.zeros(int(width) - seen.numel(), dtype=torch.long)]).to(comm)
    dist.all_reduce(seen)
    total = torch.tensor([n_samples], device=comm)
    dist.all_reduce(total)
    return seen.cpu(), int(total)


def owner_of(position: int) -> int:
    return position % torch.distributed.get_world_size()


def to_owners(site: Site, position: int, limit: int, meter: StoreMeter) -> bool:
    """Gathers one slice's kept samples on its owner rank (in rank order, cut to the first ``limit`` of each
    class, as one process would keep them). Returns True on the owner, which then holds them."""
    dist = torch.distributed
    comm, world, rank, owner = _comm(), dist.get_world_size(), dist.get_rank(), owner_of(position)
    local = torch.cat(site.chunks) if site.chunks else None
    labels = torch.cat(site.labels) if site.labels else torch.zeros(0, dtype=torch.long)
    meter.release(site.stored_bytes)
    site.chunks, site.labels = [], []
    shape = torch.tensor([labels.numel()] + (list(local.shape[1:]) if local is not None else [-1, -1]), device=comm)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    dims = next(tuple(int(d) for d in s[1:]) for s in shapes if int(s[1]) >= 0)
    longest = max(rows)
    pad = torch.zeros((longest,) + dims, dtype=torch.float32, device=comm)
    pad_l = torch.zeros(longest, dtype=torch.long, device=comm)
    if local is not None and local.shape[0]:
        pad[:local.shape[0]] = local.to(comm)
        pad_l[:labels.numel()] = labels.to(comm)
    mine = rank == owner
    got = [torch.zeros_like(pad) for _ in range(world)] if mine else None
    got_l = [torch.zeros_like(pad_l) for _ in range(world)] if mine else None
    if mine:
        meter.add(world * pad.numel() * pad.element_size())
    dist.gather(pad, got, dst=owner)
    dist.gather(pad_l, got_l, dst=owner)
    if not mine:
        return False
    data = torch.cat([d[:k] for d, k in zip(got, rows)]).cpu()
    lab = torch.cat([l[:k] for l, k in zip(got_l, rows)]).cpu()
    meter.release(world * pad.numel() * pad.element_size())
    del got, got_l
    keep = first_per_class(lab, torch.zeros(int(lab.max()) + 1 if lab.numel() else 0, dtype=torch.long), limit)
    site.chunks, site.labels = [data[keep]], [lab[keep]]
    meter.add(site.chunks[0].numel() * site.chunks[0].element_size())
    return True


def share_u(members: List[Site], u: Dict[int, torch.Tensor]) -> None:
    """Every rank receives the U each owner computed."""
    dist = torch.distributed
    comm, rank = _comm(), dist.get_rank()
    for j, s in enumerate(members):
        owner = owner_of(j)
        t = u[id(s)].to(comm) if rank == owner else torch.zeros(s.index.numel(), dtype=torch.float32, device=comm)
        dist.broadcast(t, src=owner)
        u[id(s)] = t.cpu()
