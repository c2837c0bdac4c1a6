"""Vectorised 1-Wasserstein distances between per-class empirical distributions.

Every routine works on all units, projections and class pairs at once; Python loops run only over
bounded chunks of classes, never over units or single pairs.
"""
from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["random_directions", "quantile_grid", "max_pairwise_w1"]


def random_directions(dim: int, projections: int, generator: torch.Generator) -> torch.Tensor:
    """Unit directions in R^dim, shape (dim, projections), drawn from ``generator``."""
    d = torch.randn(dim, projections, generator=generator)
    return d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)


def quantile_grid(counts: List[int]) -> tuple:
    """Common piecewise-constant grid for empirical quantile functions of unequal sample sizes.

    The quantile function of ``n`` sorted samples is constant on ((i-1)/n, i/n]. On the union of all
    breakpoints every class's quantile function is constant per interval, so W1 is an exact weighted sum.

    Returns:
        (index, weights): per class a LongTensor of sample indices at the interval midpoints, shape
        (classes, G), and the interval widths, shape (G,).
    """
    cuts = sorted({i / n for n in set(counts) for i in range(1, n)} | {0.0, 1.0})
    edges = torch.tensor(cuts, dtype=torch.float64)
    mids = (edges[1:] + edges[:-1]) / 2
    widths = (edges[1:] - edges[:-1]).float()
    n = torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
    index = torch.clamp(torch.ceil(mids.unsqueeze(0) * n).long() - 1, min=0)
    return index, widths


def max_pairwise_w1(
    samples: List[torch.Tensor], max_chunk_elems: int = 2 ** 26, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Largest (sliced) W1 between any two classes, per unit.

    Args:
        samples: one tensor per class, shape (n_k, units, projections); ``projections`` is 1 for scalar
            unit outputs (exact 1-D W1) and P for sliced W1 (the 1-D distances are averaged over directions).
        max_chunk_elems: bound on the size of the pairwise-distance block held in memory at once.
        device: where to compute (defaults to the samples' device).

    Returns:
        Tensor of shape (units,): max over class pairs of the (sliced) W1 distance.
    """
    counts = [int(s.shape[0]) for s in samples]
    units, proj = samples[0].shape[1], samples[0].shape[2]
    index, widths = quantile_grid(counts)
    device = device or samples[0].device
    widths = widths.to(device)
    # Quantile functions, weighted by interval width so that a plain L1 distance is the W1 integral.
    q = torch.stack(
        [s.to(device).sort(dim=0).values.index_select(0, index[k].to(device)) for k, s in enumerate(samples)]
    )  # (K, G, units, P)
    q = q * widths.view(1, -1, 1, 1)
    q = q.permute(2, 3, 0, 1).reshape(units * proj, len(samples), -1).contiguous()  # (units*P, K, G)
    num_classes = len(samples)
    block = max(1, int((max_chunk_elems / max(1, units * proj)) ** 0.5))
    best = torch.zeros(units, device=device)
    for i in range(0, num_classes, block):
        a = q[:, i:i + block]
        for j in range(i, num_classes, block):
            d = torch.cdist(a, q[:, j:j + block], p=1)  # (units*P, bi, bj)
            d = d.view(units, proj, d.shape[1], d.shape[2]).mean(dim=1)
            best = torch.maximum(best, d.flatten(1).amax(dim=1))
    return best
