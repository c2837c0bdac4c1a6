"""R from activations (fairpruner._scoring.taps): equal to R from weight gradients, and weights left without
gradients only where the probe confirms the identity."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
from fairpruner._scoring import taps
from helpers import assert_unchanged, randomize_norms, snapshot, tiny_loader


class _InPlace(nn.Module):
    """Conv-BN-ReLU(inplace), a conv whose output an in-place ReLU overwrites, a Linear overwritten likewise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = torch.relu_(self.conv2(x)).mean((2, 3))
        return self.fc2(torch.relu_(self.fc1(x)))


class _Tied(nn.Module):
    """fc1's weight is also read outside fc1's forward: its activation alone does not carry its Taylor terms."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + 0.5 * torch.tanh(F.linear(x, self.fc1.weight)))


def _weights_only(monkeypatch):
    monkeypatch.setattr(taps, "tap_kind", lambda module: None)


def _model(cls):
    torch.manual_seed(0)
    model = cls().eval()
    randomize_norms(model)
    return model


@pytest.mark.parametrize("cls, shape", [(_InPlace, (3, 6, 6)), (_Tied, (6,))])
def test_r_from_activations_equals_r_from_weight_gradients(monkeypatch, cls, shape):
    model = _model(cls)
    loader = tiny_loader(shape, per=6, batch=8)
    got = fp.score(model, loader, projections=8, r_reduce="sum")
    with monkeypatch.context() as m:
        _weights_only(m)
        want = fp.score(model, loader, projections=8, r_reduce="sum")
    assert got.names == want.names and got.names
    for a, b in zip(got.groups, want.groups):
        torch.testing.assert_close(a.r, b.r, rtol=1e-4, atol=1e-6 * float(b.r.abs().max()))
        torch.testing.assert_close(a.u, b.u)


def _grad_flags(model, loader):
    """requires_grad of each Linear/Conv weight as the scoring forwards see it."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: seen.__setitem__(n, mod.weight.requires_grad))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        fp.score(model, loader, projections=8)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_confirmed_members_get_no_weight_gradient_and_the_model_is_restored():
    model = _model(_InPlace)
    loader = tiny_loader((3, 6, 6), per=6, batch=8)
    before = snapshot(model)
    seen = _grad_flags(model, loader)
    # every Conv/Linear member is tapped; fc2 (the output layer) is read by no member
    assert seen == {"conv1": False, "conv2": False, "fc1": False, "fc2": False}
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_a_weight_used_outside_its_layer_keeps_its_gradient():
    model = _model(_Tied)
    seen = _grad_flags(model, tiny_loader((6,), per=6, batch=8))
    assert seen["fc1"] is True  # the probe found fc1's two sides differ


def test_integer_inputs_keep_the_weights_no_member_reads():
    """Token ids cannot carry a gradient: the embedding keeps its own, and the members after it are tapped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(8 * 5, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randint(0, 11, (24, 5), generator=torch.Generator().manual_seed(1))
    y = torch.arange(24) % 3
    loader = [(x[:12], y[:12]), (x[12:], y[12:])]
    flags = {}
    h = model[2].register_forward_pre_hook(lambda mod, i: flags.update(fc=mod.weight.requires_grad,
                                                                        emb=model[0].weight.requires_grad))
    try:
        got = fp.score(model, loader, projections=8)
    finally:
        h.remove()
    assert flags == {"fc": False, "emb": True}
    assert float(got["2"].r.abs().sum()) > 0


class _NoInputGradient(torch.autograd.Function):
    """An op on the input path with no derivative: a backward through the inputs fails."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("no derivative")


class _Preprocessed(_InPlace):
    def forward(self, x):
        return super().forward(_NoInputGradient.apply(x))


def test_a_probe_that_fails_leaves_every_weight_to_gradients(monkeypatch):
    model = _model(_Preprocessed)
    loader = tiny_loader((3, 6, 6), per=6, batch=8)
    seen = _grad_flags(model, loader)
    assert all(seen.values())  # nothing frozen: the backward never reaches the inputs
    got = fp.score(model, loader, projections=8, r_reduce="sum")
    with monkeypatch.context() as m:
        _weights_only(m)
        want = fp.score(model, loader, projections=8, r_reduce="sum")
    for a, b in zip(got.groups, want.groups):
        torch.testing.assert_close(a.r, b.r, rtol=1e-4, atol=1e-6 * float(b.r.abs().max()))
