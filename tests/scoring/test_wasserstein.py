"""Tests for fairpruner._scoring.wasserstein: exact and sliced max-pairwise W1, chunking, the quantile grid."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from fairpruner._scoring import wasserstein
from fairpruner._scoring.wasserstein import (SMALL_CLASSES, _sorting_network, max_pairwise_w1, quantile_grid,
                                             random_directions)


def _classes(counts, units, proj, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Different location and scale per class so that pairs really differ.
    return [torch.randn(n, units, proj, generator=g, dtype=dtype) * (1 + 0.3 * k) + 0.5 * k
            for k, n in enumerate(counts)]


def _w1(samples, labels_of=None, perm_seed=None, **kw):
    """Calls max_pairwise_w1 on per-class tensors: concatenated data plus a label per sample."""
    data = torch.cat(samples)
    labels = torch.cat([torch.full((s.shape[0],), k if labels_of is None else labels_of[k], dtype=torch.long)
                        for k, s in enumerate(samples)])
    if perm_seed is not None:  # interleave the classes
        perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(perm_seed))
        data, labels = data[perm], labels[perm]
    return max_pairwise_w1(data, labels, **kw)


def _naive_max_w1(samples):
    """Per unit: max over class pairs of the mean over projections of scipy's exact 1-D W1."""
    units, proj = samples[0].shape[1], samples[0].shape[2]
    out = np.zeros(units)
    for j in range(units):
        best = 0.0
        for a, b in itertools.combinations(range(len(samples)), 2):
            d = np.mean([wasserstein_distance(samples[a][:, j, p].numpy(), samples[b][:, j, p].numpy())
                         for p in range(proj)])
            best = max(best, d)
        out[j] = best
    return out


# ---------------------------------------------------------------- random_directions

def test_random_directions_shape_unit_norm_and_seeded():
    d1 = random_directions(7, 5, torch.Generator().manual_seed(3))
    d2 = random_directions(7, 5, torch.Generator().manual_seed(3))
    d3 = random_directions(7, 5, torch.Generator().manual_seed(4))
    assert d1.shape == (7, 5)
    torch.testing.assert_close(d1.norm(dim=0), torch.ones(5))
    assert torch.equal(d1, d2)
    assert not torch.equal(d1, d3)


def test_random_directions_does_not_touch_global_rng():
    state = torch.get_rng_state()
    random_directions(4, 3, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- quantile_grid

@pytest.mark.parametrize("counts", [[4], [3, 5], [2, 3, 7, 4], [32, 31, 5]])
def test_quantile_grid_weights_sum_to_one(counts):
    index, widths = quantile_grid(counts)
    assert index.shape == (len(counts), widths.numel())
    assert bool((widths > 0).all())
    assert abs(float(widths.double().sum()) - 1.0) < 1e-6


@pytest.mark.parametrize("counts", [[3, 5], [2, 3, 7, 4], [6, 6]])
def test_quantile_grid_gives_each_sample_mass_one_over_n(counts):
    """Independent property of the empirical quantile function: sample i of n covers mass exactly 1/n,
    and the indices are non-decreasing along the grid."""
    index, widths = quantile_grid(counts)
    for k, n in enumerate(counts):
        idx = index[k]
        assert int(idx.min()) == 0 and int(idx.max()) == n - 1
        assert bool((idx[1:] >= idx[:-1]).all())
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, widths.double())
        torch.testing.assert_close(mass, torch.full((n,), 1.0 / n, dtype=torch.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- max_pairwise_w1: exact 1-D

@pytest.mark.parametrize("counts, units, proj, seed", [
    ([3, 7, 5, 4], 6, 1, 1),  # exact 1-D W1 (scipy), unequal class counts
    ([4, 6, 3, 5], 5, 8, 3),  # sliced: mean over projections of the 1-D W1, per unit and pair
])
def test_matches_naive_per_unit_per_pair_loop(counts, units, proj, seed):
    samples = _classes(counts, units=units, proj=proj, seed=seed)
    got = _w1(samples)
    assert got.shape == (units,)
    np.testing.assert_allclose(got.double().numpy(), _naive_max_w1(samples), rtol=1e-5, atol=1e-6)


def test_exact_1d_matches_scipy_float32_inputs():
    samples = _classes([2, 9, 6], units=3, proj=1, seed=2, dtype=torch.float32)
    got = _w1(samples)
    np.testing.assert_allclose(got.double().numpy(), _naive_max_w1([s.double() for s in samples]),
                               rtol=1e-5, atol=1e-5)


def test_known_values_translation_and_identical_classes():
    base = torch.randn(9, 4, 1, generator=torch.Generator().manual_seed(5))
    # Identical distributions: distance 0. A pure shift by c: W1 = |c| (independent fact).
    assert torch.allclose(_w1([base, base.clone()]), torch.zeros(4), atol=1e-6)
    shifts = torch.tensor([0.0, 1.0, -2.5, 3.0]).view(1, 4, 1)
    got = _w1([base, base + shifts])
    torch.testing.assert_close(got.float(), shifts.abs().flatten(), rtol=1e-5, atol=1e-5)
    # Three classes shifted by 0, 1, 4: the max pair is (0, 4).
    got3 = _w1([base, base + 1.0, base + 4.0])
    torch.testing.assert_close(got3.float(), torch.full((4,), 4.0), rtol=1e-5, atol=1e-5)


def test_class_order_does_not_matter():
    samples = _classes([3, 6, 4, 5], units=5, proj=3, seed=7)
    a = _w1(samples)
    b = _w1(samples[::-1])
    c = _w1([samples[2], samples[0], samples[3], samples[1]])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_sample_order_within_a_class_does_not_matter():
    samples = _classes([5, 8], units=3, proj=2, seed=8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_w1(samples), _w1([samples[0], samples[1][perm]]))


# ---------------------------------------------------------------- max_pairwise_w1: sliced

def test_sliced_projection_of_real_point_clouds():
    """End to end with the projection step done here: points in R^D per unit, projected on the same seeded
    directions for every class, then compared with the naive loop."""
    g = torch.Generator().manual_seed(11)
    dim, units, proj = 6, 3, 12
    clouds = [torch.randn(n, units, dim, generator=g, dtype=torch.float64) + k for k, n in enumerate([5, 3, 4])]
    dirs = random_directions(dim, proj, torch.Generator().manual_seed(0)).double()
    projected = [c @ dirs for c in clouds]  # (n, units, proj)
    np.testing.assert_allclose(_w1(projected).double().numpy(), _naive_max_w1(projected),
                               rtol=1e-5, atol=1e-6)


def test_mean_over_projections_not_max():
    """The sliced distance averages over directions: one direction with a big shift, one with none."""
    base = torch.randn(10, 1, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shifted = base + torch.tensor([2.0, 0.0], dtype=torch.float64).view(1, 1, 2)
    torch.testing.assert_close(_w1([base, shifted]).double(),
                               torch.tensor([1.0], dtype=torch.float64), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- chunking and many classes

@pytest.mark.parametrize("max_chunk_elems", [1, 7, 100, 2 ** 26])
def test_chunking_gives_the_same_result(max_chunk_elems):
    samples = _classes([3, 5, 4, 6, 2, 7, 3], units=4, proj=3, seed=4)
    ref = _naive_max_w1(samples)
    got = _w1(samples, max_chunk_elems=max_chunk_elems)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_many_classes_chunked_equals_unchunked_and_independent_reference():
    g = torch.Generator().manual_seed(9)
    classes, n, units, proj = 200, 4, 3, 2
    samples = [torch.randn(n, units, proj, generator=g) * (1 + (k % 7) / 5) + (k % 13) / 4 for k in range(classes)]
    full = _w1(samples)
    chunked = _w1(samples, max_chunk_elems=units * proj * 49)  # blocks of 7 classes
    torch.testing.assert_close(chunked, full)
    # Independent vectorised reference for equal counts: W1 = mean |sorted a - sorted b|.
    s = torch.stack([x.double().sort(dim=0).values for x in samples])  # (K, n, units, proj)
    d = (s.unsqueeze(0) - s.unsqueeze(1)).abs().mean(dim=2).mean(dim=-1)  # (K, K, units)
    ref = d.flatten(0, 1).amax(0)
    torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-5)


def test_many_classes_unequal_counts_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(10)
    samples = [torch.randn(2 + k % 5, 2, 1, generator=g) + (k % 11) / 3 for k in range(200)]
    full = _w1(samples)
    chunked = _w1(samples, max_chunk_elems=2 * 1 * 100)
    torch.testing.assert_close(chunked, full)
    # Spot-check the winning value with scipy on the extreme classes of a few units.
    for j in range(2):
        best = max(wasserstein_distance(samples[a][:, j, 0].numpy(), samples[b][:, j, 0].numpy())
                   for a in range(0, 200, 10) for b in range(0, 200, 10))
        assert float(full[j]) >= best - 1e-5


def test_device_argument_and_output_is_finite_nonnegative():
    samples = _classes([3, 4], units=2, proj=2, seed=12, dtype=torch.float32)
    out = _w1(samples, device=torch.device("cpu"))
    assert out.device.type == "cpu"
    assert bool(torch.isfinite(out).all()) and bool((out >= 0).all())


# ---------------------------------------------------------------- labels

def test_interleaved_samples_and_arbitrary_label_values():
    """Samples need not be grouped by class, and labels need not be 0..K-1."""
    samples = _classes([3, 6, 4, 5], units=4, proj=3, seed=13)
    ref = _naive_max_w1(samples)
    for kw in ({"perm_seed": 1}, {"labels_of": [7, 2, 100, 3]}, {"labels_of": [7, 2, 100, 3], "perm_seed": 2}):
        np.testing.assert_allclose(_w1(samples, **kw).double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_shape_of_result_and_single_sample_classes():
    samples = _classes([1, 1, 2], units=3, proj=1, seed=14)
    got = _w1(samples)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.double().numpy(), _naive_max_w1(samples), rtol=1e-5, atol=1e-6)


def test_more_labels_than_samples_raise():
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        max_pairwise_w1(torch.randn(3, 2, 1), torch.tensor([0, 1, 0, 1, 1]))


def test_fewer_labels_than_samples_raise():
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        max_pairwise_w1(torch.randn(6, 2, 1), torch.tensor([0, 1, 0]))


# ---------------------------------------------------------------- few samples per class: class-major layout

@pytest.mark.parametrize("m", range(1, SMALL_CLASSES + 1))
def test_sorting_network_sorts_every_zero_one_input(m):
    """The 0-1 principle: a comparator network that sorts all 2^m binary inputs sorts every input."""
    x = torch.tensor(list(itertools.product((0.0, 1.0), repeat=m))).view(-1, m)
    cols = [c.clone() for c in x.unbind(1)]
    for i, j in _sorting_network(m):
        assert i < j < m
        cols[i], cols[j] = torch.minimum(cols[i], cols[j]), torch.maximum(cols[i], cols[j])
    assert torch.equal(torch.stack(cols, 1) if m else x, x.sort(1).values)


@pytest.mark.parametrize("k,m,pairs,raw", [(6, 4, "all", False), (40, 3, "search", False), (50, 8, "auto", True),
                                            (12, 1, "all", False)])
def test_few_samples_per_class_match_the_unit_major_path(monkeypatch, k, m, pairs, raw):
    g = torch.Generator().manual_seed(k)
    labels = torch.arange(k * m) % k  # interleaved classes
    data = torch.randn(k * m, 5, 16 if raw else 8, generator=g) * (1 + labels.view(-1, 1, 1) % 3)
    directions = random_directions(16, 8, g) if raw else None

    def run():
        return max_pairwise_w1(list(data.split(7)), labels, pairs=pairs, directions=directions)
    small = run()
    monkeypatch.setattr(wasserstein, "SMALL_CLASSES", 0)
    torch.testing.assert_close(small, run(), rtol=1e-6, atol=1e-7)
    if pairs == "all":
        assert torch.allclose(small.double(), torch.tensor(_naive_max_w1(
            [(data[labels == c] @ directions if raw else data[labels == c]).double() for c in range(k)])),
            rtol=1e-5, atol=1e-6)
