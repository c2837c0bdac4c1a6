"""Tests for fairpruner._core.state: every submodule's own train/eval flag survives the context managers and every
public call (a BatchNorm the user froze inside a model in train mode stays frozen)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from fairpruner._core.state import eval_mode, model_signature, preserved_modes, preserved_state
from helpers import tiny_loader

SHAPE = (3, 8, 8)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))


def _frozen_bn_net():
    """A model in train mode whose first BatchNorm the user put in eval mode (frozen statistics)."""
    net = _net().train()
    net[1].eval()
    return net


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def test_preserved_modes_restores_each_submodules_own_flag():
    net = _frozen_bn_net()
    want = _modes(net)
    with preserved_modes(net):
        net.train()
        net[4].eval()
        net[6].eval()
    assert _modes(net) == want
    assert net.training and not net[1].training and net[4].training  # not the root's flag copied down
    with pytest.raises(RuntimeError), preserved_modes(net):
        net.eval()
        raise RuntimeError("the body fails")
    assert _modes(net) == want  # restored on the way out of an exception too


def test_eval_mode_and_preserved_state():
    net = _frozen_bn_net()
    want = _modes(net)
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert _modes(net) == want
    with torch.no_grad():
        with preserved_state(net):
            assert torch.is_grad_enabled() and not any(m.training for m in net.modules())
        assert not torch.is_grad_enabled()  # the caller's grad mode is back
    assert _modes(net) == want


def test_model_signature_follows_names_and_shapes_only():
    a, b = _net(), _net()
    with torch.no_grad():
        b[0].weight.add_(1)
    assert model_signature(a) == model_signature(b)
    b[8] = nn.Linear(8 * 4 * 4, 3)
    assert model_signature(a) != model_signature(b)


def test_a_frozen_batchnorm_stays_frozen_through_the_public_api():
    net = _frozen_bn_net()
    want = _modes(net)
    stats = (net[1].running_mean.clone(), net[1].running_var.clone())
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    loader = tiny_loader(SHAPE, classes=2, per=4, batch=4)

    calls = {
        "count_macs": lambda: fp.count_macs(net, x),
        "measure_latency": lambda: fp.measure_latency(net, x, repeats=1, warmup=0),
        "evaluate": lambda: fp.evaluate(net, DataLoader(TensorDataset(x, torch.tensor([0, 1, 0, 1])), batch_size=2)),
        "score": lambda: fp.score(net, loader, projections=4),
    }
    results = {}
    for name, call in calls.items():
        results[name] = call()
        assert _modes(net) == want, name
    plan = fp.plan(results["score"], alpha=0.5)
    assert plan.units_removed > 0
    pruned = fp.prune(net, plan)
    assert _modes(net) == want, "prune"
    assert _modes(pruned) == want  # the pruned copy keeps the caller's choices too
    masked = fp.mask(net, plan)
    assert _modes(net) == want and _modes(masked) == want, "mask"
    fp.report(net, pruned, plan, x, latency_repeats=1)
    assert _modes(net) == want, "report"
    assert _modes(pruned) == want, "report (pruned)"
    assert torch.equal(net[1].running_mean, stats[0]) and torch.equal(net[1].running_var, stats[1])
