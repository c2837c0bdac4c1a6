"""Tests for fairpruner._planning.plans: argument checks, ToD counts, removal signals, uniform allocation,
JSON, sweep."""
from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

import fairpruner as fp
from helpers import predicted_removed
from fairpruner import zoo
from fairpruner._planning.options import STREAM_WEIGHT
from fairpruner._planning.tod import cap_floor, max_fraction, tod_counts, tod_curve


def _lowest(values, m):
    order = sorted(range(len(values)), key=lambda j: (float(values[j]), j))
    return sorted(order[:m])


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs", [{}, {"alpha": 0.1, "params": 0.2}, {"alpha": 0.1, "macs": 0.2},
                                    {"params": 0.1, "macs": 0.1}, {"alpha": 0.1, "params": 0.1, "macs": 0.1}])
def test_exactly_one_of_alpha_params_macs(resnet_scores, kwargs):
    with pytest.raises(fp.PlanError, match="exactly one"):
        fp.plan(resnet_scores, **kwargs)


@pytest.mark.parametrize("key", ["alpha", "params", "macs"])
@pytest.mark.parametrize("bad", [-0.01, 1.01, 2, float("nan"), float("inf"), -float("inf"), True, False, "0.1",
                                 [0.1]])
def test_values_outside_unit_interval_nan_bool_rejected(resnet_scores, key, bad):
    with pytest.raises(fp.PlanError, match=key):
        fp.plan(resnet_scores, **{key: bad})


def test_plan_error_is_a_value_error(resnet_scores):
    with pytest.raises(ValueError):
        fp.plan(resnet_scores, alpha=5)


def test_bounds_are_accepted(resnet_scores):
    p0 = fp.plan(resnet_scores, alpha=0)
    p1 = fp.plan(resnet_scores, alpha=1, stream_weight=1)
    assert p0.alpha == 0.0 and p1.alpha == 1.0
    for g in resnet_scores.groups:
        assert len(p1.removed[g.name]) == max_fraction(g.n_units)
    for key in ("params", "macs"):
        assert predicted_removed(fp.plan(resnet_scores, **{key: 0}), key) >= 0
        assert predicted_removed(fp.plan(resnet_scores, **{key: 0.0}), key) >= 0


@pytest.mark.parametrize("key", ["params", "macs"])
def test_zero_target_removes_nothing(resnet_scores, key):
    assert fp.plan(resnet_scores, **{key: 0.0}).units_removed == 0


def test_unknown_allocation_and_signal(resnet_scores):
    with pytest.raises(fp.PlanError, match="allocation"):
        fp.plan(resnet_scores, alpha=0.1, allocation="greedy")
    with pytest.raises(fp.PlanError, match="signal"):
        fp.plan(resnet_scores, alpha=0.1, signal="l2")
    with pytest.raises(fp.PlanError, match="alpha"):
        fp.plan(resnet_scores, alpha=0.1, allocation="uniform")


@pytest.mark.parametrize("key", ["params", "macs"])
def test_unreachable_target_says_so(resnet_scores, key):
    most = predicted_removed(fp.plan(resnet_scores, alpha=1.0), key)
    target = min(1.0, most + 0.02)
    with pytest.raises(fp.PlanError, match="cannot be met") as e:
        fp.plan(resnet_scores, **{key: target})
    assert key in str(e.value)
    with pytest.raises(fp.PlanError, match="cannot be met"):
        fp.plan(resnet_scores, **{key: 1.0})


@pytest.mark.parametrize("key", ["params", "macs"])
def test_a_target_just_beyond_reach_names_two_different_figures(resnet_scores, key):
    lo, hi = 0.5, 1.0  # bisected to the smallest refused target, within 1e-7 of the most one round removes
    for _ in range(24):
        mid = (lo + hi) / 2
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fp.plan(resnet_scores, **{key: mid})
            lo = mid
        except fp.PlanError:
            hi = mid
    with pytest.raises(fp.PlanError) as e:
        fp.plan(resnet_scores, **{key: hi})
    asked, reach = re.search(r"of ([0-9.]+)% cannot be met: the most one round can remove is ([0-9.]+)%",
                             str(e.value)).groups()
    assert asked != reach and float(asked) > float(reach)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp.plan(resnet_scores, **{key: float(reach) / 100})  # the figure named is met (it is rounded down)


def test_numpy_numbers_are_numbers(resnet_scores):
    a = fp.plan(resnet_scores, macs=np.float32(0.4), macs_power=np.float64(0.25), seed=np.int64(2), signal="random")
    b = fp.plan(resnet_scores, macs=0.4, macs_power=0.25, seed=2, signal="random")
    assert a.removed == b.removed
    with pytest.raises(fp.PlanError, match="seed must be an integer"):
        fp.plan(resnet_scores, alpha=0.1, seed=1.5)


# ---------------------------------------------------------------- ToD counts

def test_alpha_plan_uses_tod_counts(synthetic_scores):
    for alpha in (0.0, 0.05, 0.3):
        p = fp.plan(synthetic_scores, alpha=alpha)
        assert p.alpha == alpha
        for g in synthetic_scores.groups:
            w = STREAM_WEIGHT if g.is_stream else 1.0
            # the default stream floor ("shallow"), for streams of at most 4 writers like these
            assert g.writers <= 4
            free = 0 if g.feeds_output else min(math.isqrt(g.n_units), g.n_units // 8)
            curve = cap_floor(tod_curve(g.u, g.r), free) if g.is_stream else tod_curve(g.u, g.r)
            expected = int(tod_counts([curve], alpha, [w])[0])
            assert len(p.removed[g.name]) == expected
        assert p.units_total == sum(g.n_units for g in synthetic_scores.groups)
        assert p.units_removed == sum(len(v) for v in p.removed.values())


def test_every_group_listed_and_removed_channels_consistent(resnet_scores):
    p = fp.plan(resnet_scores, alpha=0.3)
    assert set(p.removed) == set(resnet_scores.names)
    for g in resnet_scores.groups:
        units = p.removed[g.name]
        assert units == sorted(set(units)) and all(0 <= u < g.n_units for u in units)
        expect = sorted(int(c) for c in g.unit_channels[units].flatten()) if units else []
        assert p.removed_channels(g.name) == expect
    with pytest.raises(KeyError):
        p.removed_channels("no.such.layer")


def test_more_alpha_more_removed(resnet_scores):
    prev = None
    for a in (0.0, 0.01, 0.05, 0.1, 0.3, 0.6, 1.0):
        p = fp.plan(resnet_scores, alpha=a)
        counts = np.array([len(p.removed[n]) for n in resnet_scores.names])
        if prev is not None:
            assert bool(np.all(counts >= prev))
        prev = counts


# ---------------------------------------------------------------- removal signals

@pytest.mark.parametrize("signal,attr", [("u", "u"), ("l1", "l1"), ("taylor", "r")])
def test_signals_remove_the_lowest_signal_units(synthetic_scores, signal, attr):
    base = fp.plan(synthetic_scores, alpha=0.3)
    p = fp.plan(synthetic_scores, alpha=0.3, signal=signal)
    assert p.settings["signal"] == signal
    for g in synthetic_scores.groups:
        m = len(base.removed[g.name])  # the count comes from ToD on (U, R), whatever the signal
        assert len(p.removed[g.name]) == m
        assert p.removed[g.name] == _lowest(getattr(g, attr), m)


def test_signals_actually_differ(synthetic_scores):
    plans = {s: fp.plan(synthetic_scores, alpha=0.3, signal=s).removed for s in ("u", "l1", "taylor", "random")}
    assert len({json.dumps(v, sort_keys=True) for v in plans.values()}) == 4


def test_random_signal_counts_seeded_and_reproducible(synthetic_scores):
    base = fp.plan(synthetic_scores, alpha=0.3)
    a = fp.plan(synthetic_scores, alpha=0.3, signal="random", seed=1)
    b = fp.plan(synthetic_scores, alpha=0.3, signal="random", seed=1)
    c = fp.plan(synthetic_scores, alpha=0.3, signal="random", seed=2)
    assert a.removed == b.removed
    assert a.removed != c.removed
    for g in synthetic_scores.groups:
        assert len(a.removed[g.name]) == len(base.removed[g.name])
    state = torch.get_rng_state()
    fp.plan(synthetic_scores, alpha=0.3, signal="random", seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_callable_signal(synthetic_scores):
    def neg_u(g):
        return -g.u
    p = fp.plan(synthetic_scores, alpha=0.3, signal=neg_u)
    base = fp.plan(synthetic_scores, alpha=0.3)
    assert p.settings["signal"] == "neg_u"
    for g in synthetic_scores.groups:
        m = len(base.removed[g.name])
        assert p.removed[g.name] == _lowest(-g.u, m)
    with pytest.raises(fp.PlanError, match="values"):
        fp.plan(synthetic_scores, alpha=0.3, signal=lambda g: torch.zeros(g.n_units + 1))


def test_ties_in_signal_broken_by_index(synthetic_scores):
    p = fp.plan(synthetic_scores, alpha=0.3, signal=lambda g: torch.zeros(g.n_units))
    base = fp.plan(synthetic_scores, alpha=0.3)
    for g in synthetic_scores.groups:
        assert p.removed[g.name] == list(range(len(base.removed[g.name])))


def test_targets_work_with_other_signals(synthetic_scores):
    p = fp.plan(synthetic_scores, params=0.3, signal="l1")
    assert abs(predicted_removed(p, "params") - 0.3) <= 0.005


# ---------------------------------------------------------------- uniform allocation

@pytest.mark.parametrize("key,target", [("params", 0.3), ("macs", 0.5)])
def test_uniform_allocation_equal_fraction_per_group(resnet_scores, key, target):
    p = fp.plan(resnet_scores, allocation="uniform", **{key: target})
    assert p.alpha is None and p.settings["allocation"] == "uniform"
    # The closest uniform fraction: above or below the target, whichever lands nearer.
    assert abs(predicted_removed(p, key) - target) <= 0.02, predicted_removed(p, key)
    fracs = {g.name: len(p.removed[g.name]) / g.n_units for g in resnet_scores.groups}
    # Every group gets the same fraction up to rounding to whole units.
    big = max(resnet_scores.groups, key=lambda g: g.n_units)
    f = fracs[big.name]
    for g in resnet_scores.groups:
        assert abs(fracs[g.name] - f) <= 0.5 / g.n_units + 1.0 / big.n_units + 1e-12
    # Groups of equal size lose exactly the same number of units.
    by_size = {}
    for g in resnet_scores.groups:
        by_size.setdefault(g.n_units, set()).add(len(p.removed[g.name]))
    assert all(len(v) == 1 for v in by_size.values())
    assert f > 0


def test_uniform_unreachable(resnet_scores):
    with pytest.raises(fp.PlanError, match="cannot be met"):
        fp.plan(resnet_scores, params=1.0, allocation="uniform")


# ---------------------------------------------------------------- JSON

@pytest.mark.parametrize("kwargs", [{"alpha": 0.3}, {"macs": 0.3}, {"params": 0.2, "allocation": "uniform"},
                                    {"alpha": 0.0}])
def test_json_round_trip(resnet_scores, kwargs):
    p = fp.plan(resnet_scores, **kwargs)
    text = p.to_json()
    json.loads(text)  # valid JSON
    q = fp.Plan.from_json(text)
    assert q.removed == p.removed
    assert q.alpha == p.alpha
    assert q.groups == p.groups
    assert q.predicted == p.predicted
    assert q.example_inputs == p.example_inputs
    assert q.settings["target"] == json.loads(json.dumps(p.settings["target"]))
    assert q.to_json() == text


def test_from_json_rejects_other_documents(resnet_scores):
    with pytest.raises(fp.PlanError):
        fp.Plan.from_json(json.dumps({"format": "something.else"}))
    d = json.loads(fp.plan(resnet_scores, alpha=0.1).to_json())
    d["version"] = 999
    with pytest.raises(fp.PlanError, match="newer"):
        fp.Plan.from_json(json.dumps(d))


def test_plan_records_settings_and_shapes(resnet_scores):
    p = fp.plan(resnet_scores, alpha=0.2)
    assert p.example_inputs and p.example_inputs[0]["shape"][1:] == [3, 16, 16]
    assert p.settings["scoring"]["projections"] == 8
    assert p.predicted["params_before"] == fp.count_params(zoo.resnet20())


# ---------------------------------------------------------------- sweep

def test_sweep_monotone_and_matches_plan(resnet_scores):
    alphas = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    rows = fp.sweep(resnet_scores, alphas)
    assert [r["alpha"] for r in rows] == alphas
    for key in ("units_removed", "params_removed", "macs_removed"):
        vals = [r[key] for r in rows]
        assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:])), key
        assert all(0 <= v < 1 for v in vals)
    for r in rows:
        p = fp.plan(resnet_scores, alpha=r["alpha"])
        assert math.isclose(r["params_removed"], predicted_removed(p, "params"), abs_tol=1e-12)
        assert math.isclose(r["macs_removed"], predicted_removed(p, "macs"), abs_tol=1e-12)
        assert math.isclose(r["units_removed"], p.units_removed / p.units_total, abs_tol=1e-12)
    assert rows[-1]["units_removed"] > rows[0]["units_removed"]


def test_sweep_default_and_bad_alpha(resnet_scores):
    assert len(fp.sweep(resnet_scores)) >= 2
    assert fp.sweep(resnet_scores, 0.1) == fp.sweep(resnet_scores, [0.1])  # one number is a sweep of one
    assert fp.sweep(resnet_scores, macs=0.3) == fp.sweep(resnet_scores, macs=[0.3])
    with pytest.raises(fp.PlanError):
        fp.sweep(resnet_scores, [0.1, 1.5])


def test_sweep_of_targets_marks_a_refused_one_and_plans_the_rest(resnet_scores, tmp_path):
    rows = fp.sweep(resnet_scores, macs=[0.3, 0.9999, 0.5])
    assert [r["target"] for r in rows] == [0.3, 0.9999, 0.5]
    assert "refused" not in rows[0] and "refused" not in rows[2]
    assert abs(rows[2]["macs_removed"] - 0.5) <= 0.005
    assert "cannot be met" in rows[1]["refused"] and "macs_removed" not in rows[1]
    with pytest.raises(fp.TargetError, match="cannot be met"):
        fp.plan(resnet_scores, macs=0.9999)  # a PlanError too, for code that catches that
    text = fp.format_sweep(rows)
    assert "refused" in text and "refused: A macs reduction of 99.99% cannot be met" in text
    assert fp.plot_sweep(rows, tmp_path / "s.png").is_file()
    measured = [r if "refused" in r else {**r, "accuracy": 0.5} for r in rows]  # accuracy of the planned rows
    assert fp.format_sweep(measured).count("50.00%") == 2
    with pytest.raises(fp.FairPrunerError, match="refused"):
        fp.plot_sweep(rows[1:2], tmp_path / "t.png")
    with pytest.raises(fp.PlanError, match=r"\[0, 1\]"):
        fp.sweep(resnet_scores, macs=[0.3, 1.5])  # bad input is an error, not a row


# ---------------------------------------------------------------- scores file round trip feeds the planner

def test_plan_from_saved_scores_is_identical(resnet_scores, tmp_path):
    path = tmp_path / "scores.pt"
    resnet_scores.save(path)
    loaded = fp.Scores.load(path)
    for kw in ({"alpha": 0.3}, {"macs": 0.3}, {"params": 0.2, "allocation": "uniform"}):
        a, b = fp.plan(resnet_scores, **kw), fp.plan(loaded, **kw)
        assert a.removed == b.removed and a.alpha == b.alpha and a.predicted == b.predicted
