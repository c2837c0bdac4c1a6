"""Tests for fairpruner._pruning.surgery (prune and mask): the architecture matrix (prune == mask, shrinks,
trains, traces), GroupNorm and grouped convolutions, and the errors for unsupported models and mismatched
plans."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
import fairpruner._pruning.surgery as surgery
from helpers import CountingLoader, assert_prune_equals_mask, fresh_inputs, randomize_norms, rel_err, tiny_loader
from fairpruner import zoo

from pruning.matrix import CASES, FAMILIES, IDS, case, scored


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize("family,target", CASES, ids=IDS)
def test_prune_shrinks_and_keeps_outputs(family, target):
    model, scores, plan, pruned = case(family, target=target)
    assert plan.units_removed > 0
    assert fp.count_params(pruned) < fp.count_params(model)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    x = fresh_inputs(FAMILIES[family][1])
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    # The output layer is never a group.
    assert scores.meta["output_layers"]
    assert not set(scores.meta["output_layers"]) & set(scores.names)
    if target == "macs":
        assert 1 - plan.predicted["macs_after"] / plan.predicted["macs_before"] >= 0.3 - 0.005


@pytest.mark.parametrize("family,target", CASES, ids=IDS)
def test_pruned_equals_masked(family, target):
    model, _, plan, pruned = case(family, target=target)
    x = fresh_inputs(FAMILIES[family][1])
    _, masked = assert_prune_equals_mask(model, plan, x, pruned=pruned)
    # Zeroing really changed something (guards against a plan that removes only dead units).
    with torch.no_grad():
        assert rel_err(model(x), masked(x)) > 1e-4


@pytest.mark.parametrize("family,target", CASES, ids=IDS)
def test_masked_model_keeps_shapes_and_zeroes_units(family, target):
    model, _, plan, _ = case(family, target=target)
    masked = fp.mask(model, plan)
    ref = model.state_dict()
    got = masked.state_dict()
    assert list(got) == list(ref)
    assert all(got[k].shape == ref[k].shape for k in ref)
    zeroed = sum(int(((ref[k] != 0) & (got[k] == 0)).sum()) for k in ref if ref[k].is_floating_point())
    assert zeroed > 0
    # Nothing else changed: every entry either equals the original or became zero.
    for k in ref:
        assert bool(((got[k] == ref[k]) | (got[k] == 0)).all()), k
    modules = dict(masked.named_modules())
    for spec in plan.groups:
        if not spec["removed_channels"]:
            continue
        root = modules[spec["name"]]
        w = root.weight.detach()
        assert bool((w[spec["removed_channels"]] == 0).all())


@pytest.mark.parametrize("family,target", CASES, ids=IDS)
def test_pruned_model_trains(family, target):
    _, _, _, pruned = case(family, target=target)
    net = copy.deepcopy(pruned).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = fresh_inputs(FAMILIES[family][1], n=4, seed=5)
    y = torch.tensor([0, 1, 2, 3])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    # Random-weight deep nets (ResNet-50) have gradient norms in the 10^4: one unclipped step at this lr
    # overflows the unpruned model as well.
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    changed = sum(not torch.equal(before[n], p) for n, p in net.named_parameters())
    assert changed > 0
    with torch.no_grad():
        assert bool(torch.isfinite(net.eval()(x)).all())


@pytest.mark.parametrize("family", ["resnet20", "densenet", "mobilenetv2", "groupnorm_cnn"])
def test_plan_json_replays_to_the_same_model(family):
    model, _, plan, pruned = case(family, target="alpha")
    again = fp.prune(model, fp.Plan.from_json(plan.to_json()))
    sd1, sd2 = pruned.state_dict(), again.state_dict()
    assert list(sd1) == list(sd2) and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_traced_and_exported_pruned_resnet20():
    _, _, _, pruned = case("resnet20", target="alpha")
    x = fresh_inputs((3, 32, 32), n=2)
    with torch.no_grad():
        ref = pruned(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(pruned, x)
        torch.testing.assert_close(traced(x), ref)
        gm = torch.fx.symbolic_trace(pruned)
        torch.testing.assert_close(gm(x), ref)
    ep = torch.export.export(pruned, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), ref)


def test_second_round_prunes_further():
    model, _, _, pruned = case("resnet20", target="alpha")
    s2 = fp.score(pruned, tiny_loader((3, 32, 32), seed=1), projections=8)
    p2 = fp.plan(s2, alpha=0.3)
    pruned2 = fp.prune(pruned, p2)
    assert fp.count_params(pruned2) < fp.count_params(pruned)
    assert_prune_equals_mask(pruned, p2, fresh_inputs((3, 32, 32)), pruned=pruned2)


def test_a_plan_scored_in_float32_prunes_the_model_in_float64():
    """The plan's synthetic inputs take the model's dtype, so no example_inputs are needed after .double()."""
    model, _, plan, pruned = case("resnet20", target="alpha")
    wide = copy.deepcopy(model).double()
    pruned64 = fp.prune(wide, plan)
    assert next(pruned64.parameters()).dtype == torch.float64
    x = fresh_inputs(FAMILIES["resnet20"][1])
    with torch.no_grad():
        torch.testing.assert_close(pruned64.eval()(x.double()).float(), pruned.eval()(x), rtol=1e-4, atol=1e-4)


def test_surgery_frees_each_parameter_it_replaces(monkeypatch):
    """The copy's replaced parameters give back their memory as the surgery goes (the traced graph holds the
    parameter objects until it is collected): a large model's peak is two models, not three."""
    model, _, plan, _ = case("resnet20", target="alpha")
    started = []  # the parameters of the copy the surgery works on, as it starts
    original = copy.deepcopy

    def deepcopy(obj, *memo):
        work = original(obj, *memo)
        if obj is model:  # the surgery's own copy, not the objects inside it
            started.extend(work.parameters())
        return work

    monkeypatch.setattr(surgery.copy, "deepcopy", deepcopy)
    pruned = fp.prune(model, plan, verify=False)
    live = {id(p) for p in pruned.parameters()}
    replaced = [p for p in started if id(p) not in live]
    assert replaced and all(p.numel() == 0 for p in replaced)
    assert all(p.numel() > 0 for p in pruned.parameters())
    assert_prune_equals_mask(model, plan, fresh_inputs((3, 32, 32)), pruned=pruned)


# ---------------------------------------------------------------- GroupNorm

def _gn_sizes(model):
    return {n: (m.num_groups, m.num_channels) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


@pytest.mark.parametrize("kwargs", [{"alpha": 0.3}, {"alpha": 1.0}, {"macs": 0.3},
                                    {"params": 0.4, "allocation": "uniform"}])
def test_groupnorm_removes_whole_groups(kwargs):
    model, _, scores = scored("groupnorm_cnn")
    plan = fp.plan(scores, **kwargs)
    assert plan.units_removed > 0
    modules = dict(model.named_modules())
    for spec in plan.groups:
        per = spec["channels"] // 8  # groupnorm_cnn: 8 groups everywhere
        assert spec["unit_size"] == per
        removed = set(spec["removed_channels"])
        assert len(removed) == per * len(plan.removed[spec["name"]])
        for block in range(8):
            chans = set(range(block * per, (block + 1) * per))
            assert chans <= removed or not chans & removed, (spec["name"], block)
        assert modules[spec["name"]].out_channels == spec["channels"]
    pruned = fp.prune(model, plan)
    before, after = _gn_sizes(model), _gn_sizes(pruned)
    assert before.keys() == after.keys()
    shrunk = 0
    for n, (g0, c0) in before.items():
        g1, c1 = after[n]
        assert c1 % g1 == 0 and c1 // g1 == c0 // g0  # group size unchanged, num_groups updated
        gn = dict(pruned.named_modules())[n]
        assert gn.weight.shape == (c1,) and gn.bias.shape == (c1,)
        shrunk += g1 < g0
    assert shrunk > 0
    assert_prune_equals_mask(model, plan, fresh_inputs((3, 16, 16)), pruned=pruned)


def test_one_group_groupnorm_stream_keeps_its_layer_scale():
    """A PoolFormer-style block: GroupNorm(1, C) normalises the stream over all its channels (a LayerNorm), so the
    stream is never cut and a layer-scale parameter on it is accepted; the MLP's hidden channels are pruned."""
    class Block(nn.Module):
        def __init__(self, c=8, hidden=16):
            super().__init__()
            self.stem, self.norm = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(1, c)
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
            self.scale = nn.Parameter(torch.full((c, 1, 1), 0.7))
            self.head = nn.Linear(c, 4)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.scale * self.fc2(F.gelu(self.fc1(self.norm(x))))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Block().eval()
    scores = fp.score(model, tiny_loader((3, 8, 8)), projections=8)
    assert [g.name for g in scores.groups] == ["fc1"]
    plan = fp.plan(scores, alpha=0.5)
    pruned = fp.prune(model, plan)
    assert pruned.fc1.out_channels < 16 and pruned.scale.shape == (8, 1, 1)
    assert_prune_equals_mask(model, plan, fresh_inputs((3, 8, 8)), pruned=pruned)


class _ResNeXtBlock(nn.Module):
    """A ResNeXt/RegNet-style bottleneck: 1x1 -> grouped 3x3 (4 groups) -> squeeze-excitation -> 1x1, residual."""

    def __init__(self, c=16, width=32, groups=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, 8, 1), nn.ReLU(), nn.Conv2d(8, width, 1),
                                nn.Sigmoid())
        self.c = nn.Sequential(nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        h = self.b(self.a(x))
        return self.head(F.relu(x + self.c(h * self.se(h))).mean((2, 3)))


@pytest.mark.parametrize("kwargs", [{"alpha": 0.5}, {"macs": 0.4}, {"params": 0.5, "allocation": "uniform"}])
def test_grouped_convolution_keeps_its_groups_balanced(kwargs):
    """Around a grouped conv a unit is one channel of every conv group (the same position in each), so every
    group keeps the same width; pruned == masked, predicted == counted."""
    torch.manual_seed(0)
    model = randomize_norms(_ResNeXtBlock().eval())
    scores = fp.score(model, tiny_loader((3, 8, 8)), projections=8)
    # The grouped conv's input channels (rooted at a.0) and its output channels (coupled by the product to the SE
    # expansion conv, where the group is rooted): 32 channels in 4 conv groups, 8 units of 4, one per conv group.
    grouped = {g.name: g for g in scores.groups if g.unit_channels.shape[1] > 1}
    assert set(grouped) == {"a.0", "se.3"}
    for g in grouped.values():
        assert g.n_units == 8 and g.unit_channels.shape == (8, 4)
        assert all(sorted(int(c) % 8 for c in unit) == [int(unit[0]) % 8] * 4 for unit in g.unit_channels)
    plan = fp.plan(scores, **kwargs)
    assert any(plan.removed[n] for n in grouped)
    pruned = fp.prune(model, plan)
    conv = pruned.b[0]
    assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.weight.shape[1] == conv.in_channels // 4
    x = fresh_inputs((3, 8, 8))
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]


# ---------------------------------------------------------------- errors

def test_pad_shortcut_refused_before_scoring():
    model = zoo.resnet20(shortcut="pad").eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    loader = CountingLoader(tiny_loader((3, 32, 32), per=6, batch=4))
    with pytest.raises(fp.UnsupportedModelError, match="pad"):
        fp.score(model, loader, projections=8)
    assert loader.drawn <= 1  # at most the first batch, for the example inputs
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


class _LSTMNet(nn.Module):
    """LSTM hidden units are a unit family (tests/families/test_recurrent.py); with proj_size they stay unsupported."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True, proj_size=4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.lstm(self.proj(x))[0][:, -1])


class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class _CustomParamNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = _Scale(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.scale(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("model,shape,what", [(_LSTMNet(), (5, 6), "proj_size"),
                                              (_CustomParamNet(), (3, 8, 8), "_Scale")])
def test_unsupported_layers(model, shape, what):
    loader = CountingLoader(tiny_loader(shape))
    with pytest.raises(fp.UnsupportedModelError, match=what):
        fp.score(model.eval(), loader, projections=8)
    assert loader.drawn <= 1


def test_functional_parameter_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.w = nn.Parameter(torch.randn(8, 8, 3, 3))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(F.conv2d(F.relu(self.c1(x)), self.w, padding=1).mean((2, 3)))

    with pytest.raises(fp.UnsupportedModelError):
        fp.score(Net().eval(), tiny_loader((3, 8, 8)), projections=8)


@pytest.mark.parametrize("apply", [fp.prune, fp.mask])
def test_plan_for_another_architecture_with_same_names(apply):
    _, _, plan, _ = case("resnet20", target="alpha")
    with pytest.raises(fp.PlanError):
        apply(zoo.resnet56().eval(), plan)


@pytest.mark.parametrize("apply", [fp.prune, fp.mask])
def test_plan_for_another_architecture(apply):
    _, _, plan, _ = case("mlp", target="alpha")
    with pytest.raises(fp.PlanError, match="does not match"):
        apply(zoo.mlp(hidden=(128, 32)).eval(), plan)
    _, _, plan_r, _ = case("resnet20", target="alpha")
    with pytest.raises(fp.PlanError):
        apply(zoo.vgg(cfg=[8, "M", 16]).eval(), plan_r)


@pytest.mark.parametrize("apply", [fp.prune, fp.mask])
def test_plan_applied_to_already_pruned_model(apply):
    _, _, plan, pruned = case("resnet20", target="alpha")
    with pytest.raises(fp.PlanError, match="already pruned"):
        apply(pruned, plan)


def test_wrong_example_inputs():
    model, _, plan, _ = case("resnet20", target="alpha")
    bad = torch.randn(2, 5)
    with pytest.raises(fp.UnsupportedModelError, match="example_inputs"):
        fp.score(model, tiny_loader((3, 32, 32)), bad, projections=8)
    with pytest.raises(fp.UnsupportedModelError, match="example_inputs"):
        fp.prune(model, plan, bad)
    with pytest.raises(fp.UnsupportedModelError, match="example_inputs"):
        fp.mask(model, plan, bad)


def test_invalid_plan_channels_rejected():
    model, _, plan, _ = case("mlp", target="alpha")
    bad = fp.Plan.from_json(plan.to_json())
    spec = bad.groups[0]
    spec["removed_channels"] = list(range(spec["channels"]))  # everything
    with pytest.raises(fp.PlanError, match="invalid"):
        fp.prune(model, bad)
    spec["removed_channels"] = [spec["channels"] + 3]
    with pytest.raises(fp.PlanError, match="invalid"):
        fp.prune(model, bad)


def test_prune_without_recorded_shapes_needs_example_inputs():
    model, _, plan, pruned = case("mlp", target="alpha")
    bare = fp.Plan(plan.removed, plan.alpha, plan.groups, plan.settings, plan.predicted, [])
    with pytest.raises(fp.PlanError, match="example_inputs"):
        fp.prune(model, bare)
    again = fp.prune(model, bare, torch.randn(2, 64))
    assert fp.count_params(again) == fp.count_params(pruned)
