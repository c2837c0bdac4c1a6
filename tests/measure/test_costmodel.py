"""Tests for fairpruner._measure.costmodel: predicted params/MACs equal those of the really pruned model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fairpruner as fp
from helpers import Scored, tiny_loader
from fairpruner import zoo
from fairpruner._measure.costmodel import CostModel


CASES = {
    "resnet20": (lambda: zoo.resnet20(), (3, 32, 32)),
    "densenet": (lambda: zoo.densenet(), (3, 32, 32)),
    "mobilenetv2": (lambda: zoo.mobilenetv2(width_mult=0.5), (3, 32, 32)),
    "mlp": (lambda: zoo.mlp(), (64,)),
    "mlp_bn": (lambda: zoo.mlp(batch_norm=True), (64,)),
    "groupnorm_cnn": (lambda: zoo.groupnorm_cnn(channels=(16, 32)), (3, 16, 16)),
    "conv1d_net": (lambda: zoo.conv1d_net(), (1, 64)),
}


def _setup(name):
    torch.manual_seed(0)
    make, shape = CASES[name]
    return make().eval(), tiny_loader(shape, classes=4, per=3, batch=6), {}


scored = Scored(_setup)


def _example(name):
    """(model, the first calibration batch, scores)."""
    model, loader, scores = scored(name)
    return model, loader[0][0], scores


def _check(model, x, plan):
    pruned = fp.prune(model, plan, x)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    assert fp.count_params(model) == plan.predicted["params_before"]
    assert fp.count_macs(model, x) == plan.predicted["macs_before"]
    return pruned


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_equals_counted_after_tod_plans(name):
    model, x, scores = _example(name)
    p = fp.plan(scores, alpha=0.3)
    assert p.units_removed > 0
    pruned = _check(model, x, p)
    assert fp.count_params(pruned) < fp.count_params(model)


@pytest.mark.parametrize("name", ["resnet20", "densenet", "mobilenetv2", "mlp"])
def test_predicted_equals_counted_for_other_plans(name):
    model, x, scores = _example(name)
    for kw in ({"alpha": 1.0}, {"macs": 0.3, "signal": "random"}, {"params": 0.25, "allocation": "uniform"}):
        _check(model, x, fp.plan(scores, **kw))


def test_cost_of_zero_removal_is_the_model():
    model, x, scores = _example("densenet")
    before = scores.cost.evaluate(np.zeros(len(scores.groups)))
    assert before == {"params": float(fp.count_params(model)), "macs": float(fp.count_macs(model, x))}


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "densenet"])
def test_unit_cost_is_the_cost_of_removing_one_unit(name):
    """Per group, what one unit holds: the drop of evaluate() for one unit, up to the second-order term of
    axes both sides of a term cut (a depthwise weight's in and out channels)."""
    _, _, scores = _example(name)
    cost, n = scores.cost, len(scores.groups)
    before, per_unit = cost.evaluate(np.zeros(n)), cost.unit_cost()
    for i in range(n):
        one = np.zeros(n)
        one[i] = 1
        after = cost.evaluate(one)
        for key in ("params", "macs"):
            drop = before[key] - after[key]
            assert per_unit[key][i] >= drop - 0.5
            assert per_unit[key][i] == pytest.approx(drop, rel=0.02, abs=1.0)


def test_cost_monotone_in_removed_units():
    _, _, scores = _example("resnet20")
    cost = scores.cost
    units = np.array([g.n_units for g in scores.groups])
    prev = cost.evaluate(np.zeros(len(units)))
    for i in range(len(units)):
        removed = np.zeros(len(units))
        removed[i] = units[i] // 2
        now = cost.evaluate(removed)
        assert now["params"] < prev["params"] and now["macs"] <= prev["macs"]


def test_dict_round_trip_and_weights_only_file(tmp_path):
    _, _, scores = _example("mobilenetv2")
    d = scores.cost.to_dict()
    assert all(torch.is_tensor(v) for v in d.values())
    path = tmp_path / "cost.pt"
    torch.save(d, path)
    again = CostModel.from_dict(torch.load(path, weights_only=True))
    rng = np.random.default_rng(0)
    for _ in range(5):
        removed = np.array([rng.integers(0, g.n_units // 2 + 1) for g in scores.groups])
        assert again.evaluate(removed) == scores.cost.evaluate(removed)


def test_evaluate_is_exact_for_a_handmade_plan():
    """Remove a chosen number of units from one group, prune, count: exercises the cost model without ToD."""
    model, x, scores = _example("resnet20")
    p = fp.plan(scores, alpha=0.0)
    # Rebuild a plan removing units 0..3 of the residual stream group only.
    name = "conv1"
    g = scores[name]
    removed = {n: [] for n in scores.names}
    removed[name] = [0, 1, 2, 3]
    groups = [dict(spec, removed_channels=(sorted(int(c) for c in g.unit_channels[:4].flatten())
                                           if spec["name"] == name else [])) for spec in p.groups]
    counts = np.array([len(removed[n]) for n in scores.names])
    after = scores.cost.evaluate(counts)
    handmade = fp.Plan(removed, None, groups, dict(p.settings), {}, list(p.example_inputs))
    pruned = fp.prune(model, handmade, x)
    assert fp.count_params(pruned) == after["params"]
    assert fp.count_macs(pruned, x) == after["macs"]
