"""Tests for fairpruner._planning.tod against a brute-force O(n^2) Tolerance of Difference written from
METHOD.md §2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairpruner._planning.tod import (candidate_alphas, cap_floor, max_fraction, rank_ascending, tod_counts,
                                     tod_curve)

ALPHAS = [0.0, 0.005, 0.01, 0.015, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.9, 0.99, 1.0]


# ---------------------------------------------------------------- brute force (METHOD.md §2)

def _lowest(values, m):
    """The m units with the lowest value; among equal values the lower index goes first."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    return set(order[:m])


def _highest(values, m):
    """The m units with the highest value; among equal values the lower index is protected first."""
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return set(order[:m])


def brute_ratios(u, r):
    """ToD(m) = |Remove(m) ∩ Protect(m)| / m for m = 1..floor(0.99 n), by set intersections."""
    u, r = [float(x) for x in u], [float(x) for x in r]
    n = len(u)
    limit = math.floor(0.99 * n + 1e-9)
    return [len(_lowest(u, m) & _highest(r, m)) / m for m in range(1, limit + 1)]


def brute_m_hat(u, r, alpha):
    """Largest m <= floor(0.99 n) with ToD(m) <= alpha; 0 if none. Alphas are decimal numbers, so compare
    with a tolerance far below any k/m gap."""
    ratios = brute_ratios(u, r)
    good = [m for m, t in enumerate(ratios, start=1) if t <= alpha + 1e-9]
    return max(good) if good else 0


def _alphas_for(u, r):
    """Fixed alphas plus every exact ratio k/m of this instance and points just around them."""
    exact = sorted(set(brute_ratios(u, r)))
    return sorted(set(ALPHAS + exact + [max(0.0, a - 1e-6) for a in exact] + [min(1.0, a + 1e-6) for a in exact]))


def _check_instance(u, r):
    u_t, r_t = torch.as_tensor(u, dtype=torch.float32), torch.as_tensor(r, dtype=torch.float32)
    curve = tod_curve(u_t, r_t)
    ratios = brute_ratios(u_t.tolist(), r_t.tolist())
    assert len(curve) == len(ratios)
    # The curve is the suffix minimum of the ratio curve.
    suffix = [min(ratios[i:]) for i in range(len(ratios))]
    np.testing.assert_allclose(curve, suffix, rtol=0, atol=1e-12)
    for a in _alphas_for(u_t.tolist(), r_t.tolist()):
        expected = brute_m_hat(u_t.tolist(), r_t.tolist(), a)
        assert int(tod_counts([curve], a)[0]) == expected, (u, r, a)


# ---------------------------------------------------------------- equality with brute force

@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_random_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    levels = int(rng.integers(1, 8))  # few distinct values: many ties
    u = rng.integers(0, levels, n).astype(float)
    r = rng.integers(0, levels, n).astype(float) * rng.choice([1.0, 0.5])
    _check_instance(u, r)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_continuous(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 120))
    u = rng.standard_normal(n)
    r = np.abs(rng.standard_normal(n)) ** 3
    _check_instance(u, r)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=40))
def test_matches_brute_force_hypothesis(pairs):
    u = [float(a) for a, _ in pairs]
    r = [float(b) for _, b in pairs]
    _check_instance(u, r)


def test_matches_brute_force_several_groups_at_once():
    rng = np.random.default_rng(7)
    groups = [(rng.integers(0, 4, n).astype(float), rng.standard_normal(n)) for n in (1, 2, 3, 17, 64)]
    curves = [tod_curve(torch.tensor(u), torch.tensor(r)) for u, r in groups]
    for a in ALPHAS:
        got = tod_counts(curves, a)
        assert got.dtype == np.int64 and got.shape == (len(groups),)
        assert got.tolist() == [brute_m_hat(u.tolist(), r.tolist(), a) for u, r in groups]


# ---------------------------------------------------------------- structural properties

@pytest.mark.parametrize("seed", range(5))
def test_m_hat_non_decreasing_in_alpha(seed):
    rng = np.random.default_rng(seed)
    n = 80
    u, r = torch.tensor(rng.standard_normal(n)), torch.tensor(rng.standard_normal(n))
    curve = tod_curve(u, r)
    assert bool(np.all(np.diff(curve) >= 0))
    grid = np.linspace(0, 1, 201)
    counts = [int(tod_counts([curve], a)[0]) for a in grid]
    assert all(b >= a for a, b in zip(counts, counts[1:]))
    # ToD itself is not monotone in m (METHOD.md): check the brute-force ratio on this instance is bounded.
    assert counts[-1] == max_fraction(n)  # alpha = 1 allows every m


def test_m_hat_bounded_by_max_fraction_and_half_for_small_alpha():
    rng = np.random.default_rng(3)
    for n in (1, 2, 10, 99, 100, 250):
        u, r = torch.tensor(rng.standard_normal(n)), torch.tensor(rng.standard_normal(n))
        curve = tod_curve(u, r)
        assert len(curve) == max_fraction(n)
        assert int(tod_counts([curve], 1.0)[0]) == max_fraction(n)
        # The two size-m sets overlap in >= 2m - n units: ToD(m) >= 2 - n/m, so m_hat <= n / (2 - alpha).
        for a in (0.0, 0.1, 0.5):
            assert int(tod_counts([curve], a)[0]) <= n / (2 - a) + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_invariant_to_monotone_rescaling(seed):
    rng = np.random.default_rng(seed)
    n = 50
    u = torch.tensor(rng.integers(0, 10, n).astype(float))
    r = torch.tensor(np.abs(rng.standard_normal(n)))
    u2 = torch.exp(u / 3) * 5 + 2        # strictly increasing map of U
    r2 = r ** 3 * 1e4 + 7                # strictly increasing map of R (R >= 0)
    c1, c2 = tod_curve(u, r), tod_curve(u2, r2)
    np.testing.assert_array_equal(c1, c2)
    for a in ALPHAS:
        assert tod_counts([c1], a)[0] == tod_counts([c2], a)[0]


def test_decreasing_map_of_u_changes_result():
    """Sanity check that the curve depends on the ranking at all (guards against a constant output)."""
    u = torch.arange(10.0)
    r = torch.arange(10.0)  # highest R at the highest index: lowest-U and highest-R sets are disjoint
    assert int(tod_counts([tod_curve(u, r)], 0.0)[0]) == 5
    # Flip U: lowest U = highest R, they coincide for every m.
    assert int(tod_counts([tod_curve(-u, r)], 0.5)[0]) == 0


# ---------------------------------------------------------------- tie rule (documented in _tod.py)

def test_tie_rule_all_equal():
    """Equal U: lower index removed first; equal R: lower index protected first. So the two sets of size m
    are both {0..m-1}: ToD(m) = 1 for every m."""
    n = 10
    curve = tod_curve(torch.ones(n), torch.ones(n))
    np.testing.assert_array_equal(curve, np.ones(max_fraction(n)))
    assert int(tod_counts([curve], 0.99)[0]) == 0
    assert int(tod_counts([curve], 1.0)[0]) == max_fraction(n)


def test_tie_rule_equal_u_distinct_r():
    """Equal U removes units 0..m-1; R increasing with the index protects the last m: overlap max(0, 2m-n)."""
    n = 10
    curve = tod_curve(torch.zeros(n), torch.arange(n, dtype=torch.float32))
    expected = [max(0, 2 * m - n) / m for m in range(1, max_fraction(n) + 1)]
    suffix = [min(expected[i:]) for i in range(len(expected))]
    np.testing.assert_allclose(curve, suffix)
    assert int(tod_counts([curve], 0.0)[0]) == 5


def test_tie_rule_distinct_u_equal_r():
    """Equal R protects units 0..m-1; U decreasing with the index removes the last m first."""
    n = 8
    curve = tod_curve(-torch.arange(n, dtype=torch.float32), torch.zeros(n))
    assert int(tod_counts([curve], 0.0)[0]) == 4
    # U increasing with the index removes units 0..m-1 too: total overlap.
    curve2 = tod_curve(torch.arange(n, dtype=torch.float32), torch.zeros(n))
    assert int(tod_counts([curve2], 0.9)[0]) == 0


def test_rank_ascending_ties_by_index():
    ranks = rank_ascending(torch.tensor([3.0, 1.0, 3.0, 1.0, 2.0]))
    assert ranks.tolist() == [3, 0, 4, 1, 2]
    ranks_desc = rank_ascending(-torch.tensor([3.0, 1.0, 3.0, 1.0, 2.0]))
    assert ranks_desc.tolist() == [0, 3, 1, 4, 2]


# ---------------------------------------------------------------- small pieces and edge cases

@pytest.mark.parametrize("n,expected", [(0, 0), (1, 0), (2, 1), (50, 49), (99, 98), (100, 99), (101, 99), (1000, 990)])
def test_max_fraction(n, expected):
    assert max_fraction(n) == expected == math.floor(0.99 * n + 1e-9)


def test_single_unit_group_never_pruned():
    curve = tod_curve(torch.tensor([1.0]), torch.tensor([2.0]))
    assert curve.size == 0
    assert tod_counts([curve], 1.0).tolist() == [0]


def test_cap_floor_prices_the_floor_beyond_free_at_the_first_positive_level():
    curve = np.array([0.0, 0.0, 0.0, 0.0, 0.2, 0.25, 0.3])
    assert cap_floor(curve, 2).tolist() == [0.0, 0.0, 0.2, 0.2, 0.2, 0.25, 0.3]
    assert cap_floor(curve, 0).tolist() == [0.2, 0.2, 0.2, 0.2, 0.2, 0.25, 0.3]
    assert cap_floor(curve, 4) is curve and cap_floor(curve, 9) is curve  # nothing beyond the cap
    assert cap_floor(np.zeros(4), 1).tolist() == [0.0, 1.0, 1.0, 1.0]  # no positive level: priced at 1
    assert curve.tolist()[:4] == [0.0] * 4  # the input is not changed


def test_empty_curve_list():
    assert tod_counts([], 0.3).shape == (0,)


def test_candidate_alphas_are_where_counts_change():
    rng = np.random.default_rng(5)
    curves = [tod_curve(torch.tensor(rng.standard_normal(n)), torch.tensor(rng.standard_normal(n)))
              for n in (5, 16, 33)]
    cands = candidate_alphas(curves)
    assert cands[0] == 0.0 and bool(np.all(np.diff(cands) > 0))
    # Between two consecutive candidates the counts do not change; at a candidate they may.
    for lo, hi in zip(cands[:-1], cands[1:]):
        mid = (lo + hi) / 2
        np.testing.assert_array_equal(tod_counts(curves, lo), tod_counts(curves, mid))
        assert not np.array_equal(tod_counts(curves, lo), tod_counts(curves, hi))
    above = min(1.0, cands[-1] + (1 - cands[-1]) / 2)
    np.testing.assert_array_equal(tod_counts(curves, cands[-1]), tod_counts(curves, above))


def test_inputs_not_modified():
    u, r = torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([0.5, 0.1, 0.5, 0.9])
    u0, r0 = u.clone(), r.clone()
    tod_curve(u, r)
    assert torch.equal(u, u0) and torch.equal(r, r0)


@pytest.mark.parametrize("seed", range(20))
def test_a_group_s_own_limit_is_the_brute_force_m_hat_within_it(seed):
    """``most`` bounds m itself, not the curve's length: the suffix minimum is taken within the limit (a cut curve
    would let m reach the limit through a ratio beyond it)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 40, (1,), generator=g))
    u, r = torch.randint(0, 6, (n,), generator=g).float(), torch.randint(0, 6, (n,), generator=g).float()
    most = int(torch.randint(0, n, (1,), generator=g))
    curve = tod_curve(u, r, most)
    assert len(curve) == min(most, max_fraction(n))
    ratios = brute_ratios(u.tolist(), r.tolist())[:most]
    for alpha in ALPHAS:
        good = [m for m, t in enumerate(ratios, start=1) if t <= alpha + 1e-9]
        assert tod_counts([curve], alpha)[0] == (max(good) if good else 0)
