"""Tests for fairpruner._core.groups and the surgery helper of _core.layers: a member's positions along one dim or
along a pair of dims (stacked experts' hidden units), summed per root channel, zeroed and sliced in place."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fairpruner._core.groups import Member, dim_size, fill_positions_, per_channel
from fairpruner._core.layers import slice_param_


def test_pair_dims_number_positions_row_major():
    t = torch.arange(2 * 5 * 3, dtype=torch.float64).view(2, 5, 3)  # (experts, H, units)
    root = torch.arange(6)
    m = Member("m", "out", root.view(-1, 1), "other", (("w", (0, 2)),))
    assert dim_size(t, (0, 2)) == 6 and dim_size(t, 1) == 5
    # root channel e * 3 + j owns t[e, :, j]
    expected = torch.stack([t[e, :, j].sum() for e in range(2) for j in range(3)])
    assert torch.equal(per_channel(t, (0, 2), m), expected)
    assert torch.equal(per_channel(t, 1, Member("m", "out", torch.arange(5).view(-1, 1), "other")), t.sum((0, 2)))


def test_fill_positions_writes_the_parameter_in_place():
    p = nn.Parameter(torch.ones(2, 5, 3))
    with torch.no_grad():
        fill_positions_(p, (0, 2), torch.tensor([1, 5]))  # expert 0 unit 1, expert 1 unit 2
    zero = torch.zeros(2, 3, dtype=torch.bool)
    zero[0, 1] = zero[1, 2] = True
    assert bool((p[:, :, :].transpose(1, 2)[zero] == 0).all()) and int((p == 0).sum()) == 2 * 5
    with torch.no_grad():
        fill_positions_(p, 1, torch.tensor([0]))
    assert bool((p[:, 0] == 0).all())


def test_slice_param_keeps_equal_counts_per_pair_row():
    m = nn.Module()
    m.w = nn.Parameter(torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3), requires_grad=False)
    old = m.w.detach().clone()
    slice_param_(m, "w", (0, 1), torch.tensor([0, 2, 5, 7]))  # expert 0 keeps rows 0, 2; expert 1 rows 1, 3
    assert m.w.shape == (2, 2, 3) and m.w.is_contiguous() and not m.w.requires_grad
    assert torch.equal(m.w, torch.stack([old[0, [0, 2]], old[1, [1, 3]]]))
    with pytest.raises(ValueError, match="must keep as many"):
        slice_param_(m, "w", (0, 1), torch.tensor([0, 1, 2]))
