"""torch.distributed: every rank ends with the same gradient sums and the same kept samples, so the same scores."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .labels import first_per_class
from .sites import Site

__all__ = ["distributed", "merge_ranks"]


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def merge_ranks(work: nn.Module, sites: List[Site], seen: torch.Tensor, n_samples: int, limit: int):
    """Combines the shards of a torch.distributed run so that every rank holds the same totals.

    Gradients and sample counts are summed; each site's kept samples are gathered in rank order and cut
    to the first ``limit`` per class, so every rank computes identical scores.
    """
    dist = torch.distributed
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in work.parameters()]
    flat = torch.cat([g.flatten() for g in grads]).to(comm)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(work.parameters(), grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(p.device)
        offset += g.numel()
    width = torch.tensor([seen.numel()], device=comm)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    seen = torch.cat([seen, torch.zeros(int(width) - seen.numel(), dtype=torch.long)]).to(comm)
    dist.all_reduce(seen)
    total = torch.tensor([n_samples], device=comm)
    dist.all_reduce(total)
    for s in sites:
        data, labels = _all_gather_rows(torch.cat(s.chunks).to(comm), torch.cat(s.labels).to(comm))
        keep = first_per_class(labels.cpu(), torch.zeros(int(width), dtype=torch.long), limit)
        s.chunks, s.labels = [data.cpu()[keep]], [labels.cpu()[keep]]
    return seen.cpu(), int(total)


def _all_gather_rows(data: torch.Tensor, labels: torch.Tensor) -> tuple:
    """all_gather of row blocks whose length differs between ranks (padded, then trimmed)."""
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([labels.numel()], device=labels.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(x) for x in sizes))
    shape = tuple(data.shape[1:]) if data.dim() > 1 else ()
    pad_d = torch.zeros((longest,) + shape, dtype=data.dtype, device=data.device)
    pad_d[:data.shape[0]] = data
    pad_l = torch.zeros(longest, dtype=labels.dtype, device=labels.device)
    pad_l[:labels.numel()] = labels
    all_d = [torch.zeros_like(pad_d) for _ in range(world)]
    all_l = [torch.zeros_like(pad_l) for _ in range(world)]
    dist.all_gather(all_d, pad_d)
    dist.all_gather(all_l, pad_l)
    return (torch.cat([d[:int(k)] for d, k in zip(all_d, sizes)]),
            torch.cat([l[:int(k)] for l, k in zip(all_l, sizes)]))

