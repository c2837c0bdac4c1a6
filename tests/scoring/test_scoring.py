"""Tests for fairpruner._scoring.run: the caller's model is never changed, data errors come early, and U/R equal
naive reference computations."""
from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from helpers import assert_unchanged, randomize_norms, snapshot, tiny_loader
from fairpruner import zoo


def assert_scores_equal(a, b):
    assert a.names == b.names
    for ga, gb in zip(a.groups, b.groups):
        torch.testing.assert_close(ga.u, gb.u, rtol=1e-6, atol=0)
        torch.testing.assert_close(ga.r, gb.r, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ga.l1, gb.l1, rtol=0, atol=0)
        assert torch.equal(ga.unit_channels, gb.unit_channels)


# ---------------------------------------------------------------- the caller's model is never changed

@pytest.mark.parametrize("family,shape", [("digits_cnn", (1, 8, 8)), ("mobilenetv2", (3, 16, 16))])
def test_model_never_changed(family, shape):
    torch.manual_seed(0)
    kwargs = {"width_mult": 0.25} if family == "mobilenetv2" else {}
    model = randomize_norms(zoo.create(family, **kwargs))
    model.train()  # train mode: scoring must not move BN statistics nor leave dropout on
    model.classifier.eval()  # a mixed train/eval state that must be preserved as it is
    frozen = [n for n, _ in model.named_parameters()][3:6]  # a conv weight and a BN's affine, mid-network
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    loader = tiny_loader(shape)
    inputs = [x.clone() for x, _ in loader]
    snap = snapshot(model)
    scores = fp.score(model, loader, projections=8)
    assert_unchanged(model, snap, "score")
    assert all(torch.equal(x, x0) for (x, _), x0 in zip(loader, inputs))
    plan = fp.plan(scores, alpha=0.3)
    assert_unchanged(model, snap, "plan")
    pruned = fp.prune(model, plan)
    assert_unchanged(model, snap, "prune")
    masked = fp.mask(model, plan)
    assert_unchanged(model, snap, "mask")
    # The copies keep the caller's frozen/trainable choice and train/eval flags.
    for out in (pruned, masked):
        assert {n: p.requires_grad for n, p in out.named_parameters()} == snap["requires_grad"]
        assert {n: m.training for n, m in out.named_modules()} == snap["training"]
        assert all(p.grad is None for p in out.parameters())


@pytest.mark.parametrize("apply", [fp.prune, fp.mask])
def test_frozen_first_layer(apply):
    model = randomize_norms(zoo.digits_cnn()).eval()
    scores = fp.score(model, tiny_loader((1, 8, 8)), projections=8)
    plan = fp.plan(scores, alpha=0.3)
    model.features[0].weight.requires_grad_(False)
    out = apply(model, plan)
    assert out.features[0].weight.requires_grad is False


def test_scores_do_not_depend_on_train_mode_of_the_caller():
    torch.manual_seed(0)
    model = randomize_norms(zoo.digits_cnn())
    loader = tiny_loader((1, 8, 8))
    a = fp.score(copy.deepcopy(model).train(), loader, projections=8)
    b = fp.score(copy.deepcopy(model).eval(), loader, projections=8)
    assert_scores_equal(a, b)


def _relu_net(inplace, batch_norm):
    torch.manual_seed(3)
    bn = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 12, 3, padding=1), bn(12), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10), nn.ReLU(inplace=inplace), nn.Linear(10, 4))
    return randomize_norms(net).eval()


@pytest.mark.parametrize("u_at", ["output", "norm", "input"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_inplace_relu_does_not_corrupt_scores(u_at, batch_norm):
    loader = tiny_loader((3, 8, 8))
    a = fp.score(_relu_net(True, batch_norm), loader, projections=8, u_at=u_at)
    b = fp.score(_relu_net(False, batch_norm), loader, projections=8, u_at=u_at)
    assert_scores_equal(a, b)
    # The measured tensor is the raw output (may be negative), not the ReLU'd one: U of the plain conv at
    # "output" must differ from the U measured after the activation ("input" of the next layer).
    if u_at == "output" and not batch_norm:
        c = fp.score(_relu_net(True, batch_norm), loader, projections=8, u_at="input")
        assert not torch.allclose(a.groups[-1].u, c.groups[-1].u) or not torch.allclose(a.groups[0].u, c.groups[0].u)


def test_nothing_written_to_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")

    def listing():
        return sorted((os.path.relpath(os.path.join(d, f), tmp_path), os.path.getsize(os.path.join(d, f)))
                      for d, _, files in os.walk(tmp_path) for f in files)

    before = listing()
    model = zoo.digits_cnn().eval()
    scores = fp.score(model, tiny_loader((1, 8, 8)), projections=8)
    plan = fp.plan(scores, macs=0.2)
    fp.prune(model, plan)
    fp.mask(model, plan)
    fp.sweep(scores)
    assert listing() == before


# ---------------------------------------------------------------- determinism

def test_same_seed_same_scores_and_plan_different_seed_different_u():
    model = randomize_norms(zoo.digits_cnn()).eval()
    loader = tiny_loader((1, 8, 8))
    a = fp.score(model, loader, projections=8, seed=1, u_at="input")
    b = fp.score(model, loader, projections=8, seed=1, u_at="input")
    c = fp.score(model, loader, projections=8, seed=2, u_at="input")
    assert_scores_equal(a, b)
    assert_scores_equal(fp.score(model, loader, projections=8, seed=1), fp.score(model, loader, projections=8, seed=1))
    assert fp.plan(a, alpha=0.3).removed == fp.plan(b, alpha=0.3).removed
    for ga, gc in zip(a.groups, c.groups):
        if ga.name == "features.7":  # feeds the classifier through global pooling: exact 1-D U, no directions
            torch.testing.assert_close(ga.u, gc.u)
        else:  # measured on feature maps: sliced W1 over seeded directions
            assert not torch.allclose(ga.u, gc.u)
        torch.testing.assert_close(ga.r, gc.r)  # R does not use the projections
    assert a.meta["seed"] == 1 and c.meta["seed"] == 2


def test_linear_u_does_not_depend_on_seed():
    model = zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4).eval()
    loader = tiny_loader((16,))
    a = fp.score(model, loader, projections=8, seed=1)
    c = fp.score(model, loader, projections=8, seed=5)
    for ga, gc in zip(a.groups, c.groups):
        torch.testing.assert_close(ga.u, gc.u)


# ---------------------------------------------------------------- data and argument errors, before the pass

class _Counted(nn.Module):
    """Counts forward calls of the model and of its deep copies (class-level counter)."""

    calls = 0

    def __init__(self):
        super().__init__()
        self.net = zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4)

    def forward(self, x):
        type(self).calls += 1
        return self.net(x)


def _counted():
    _Counted.calls = 0
    return _Counted().eval()


def _xy(labels, dim=16, seed=0):
    labels = torch.as_tensor(labels)
    x = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return x, labels


@pytest.mark.parametrize("as_dataloader", [False, True])
@pytest.mark.parametrize("labels,match", [
    ([0] * 8, "single class"),
    ([0, 0, 0, 1, 1, 1, 2], "fewer than 2"),
    ([0, 0, 0, 2, 2, 2], r"\[1\]"),
    ([0, 0, 3, 3, 1, 1], r"\[2\]"),
])
def test_class_errors_before_any_forward(labels, match, as_dataloader):
    model = _counted()
    x, y = _xy(labels)
    loader = DataLoader(TensorDataset(x, y), batch_size=4) if as_dataloader else [(x[:4], y[:4]), (x[4:], y[4:])]
    with pytest.raises(fp.DataError, match=match):
        fp.score(model, loader, projections=8)
    assert _Counted.calls == 0


def test_unlabelled_batches():
    model = _counted()
    x, _ = _xy([0, 1] * 4)
    with pytest.raises(fp.DataError, match="label"):
        fp.score(model, [x[:4], x[4:]], projections=8)
    with pytest.raises(fp.DataError, match="label"):
        fp.score(model, DataLoader(TensorDataset(x), batch_size=4), projections=8)
    with pytest.raises(fp.DataError):
        fp.score(model, [{"x": x, "y": torch.zeros(8)}], projections=8)
    with pytest.raises(fp.DataError):
        fp.score(model, [(x, torch.zeros(8, dtype=torch.long), None)], projections=8)
    assert _Counted.calls == 0


@pytest.mark.parametrize("targets,match", [
    (torch.tensor([0.0, 1.0] * 4), "integer"),
    (torch.tensor([True, False] * 4), "integer"),
    (F.one_hot(torch.tensor([0, 1] * 4), 4), "argmax"),
    (torch.tensor([0, -1] * 4), "negative"),
])
def test_bad_targets(targets, match):
    model = _counted()
    x, _ = _xy([0, 1] * 4)
    with pytest.raises(fp.DataError, match=match):
        fp.score(model, [(x, targets)], projections=8)
    assert _Counted.calls == 0


def test_float_targets_in_a_dataloader():
    model = _counted()
    x, _ = _xy([0, 1] * 4)
    with pytest.raises(fp.DataError, match="integer"):
        fp.score(model, DataLoader(TensorDataset(x, torch.tensor([0.0, 1.0] * 4)), batch_size=4), projections=8)
    assert _Counted.calls == 0


def test_empty_loader():
    with pytest.raises(fp.DataError, match="empty"):
        fp.score(_counted(), iter([]), projections=8)


def test_label_out_of_range_for_the_model():
    x, y = _xy([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7])  # the model has 4 outputs
    with pytest.raises(fp.DataError, match="out of range"):
        fp.score(_counted(), [(x, y)], projections=8)


@pytest.mark.parametrize("where", ["first", "later"])
def test_nan_inputs(where):
    x, y = _xy([0, 1, 2, 3] * 4)
    if where == "first":
        x[1, 3] = float("nan")
    else:
        x[13, 0] = float("nan")
    with pytest.raises(fp.DataError, match="NaN"):
        fp.score(_counted(), [(x[:8], y[:8]), (x[8:], y[8:])], projections=8)


def test_nan_in_a_sample_not_kept_for_u():
    """A NaN in a sample past samples_per_class still poisons R: it must be reported."""
    x, y = _xy([0, 1, 2, 3] * 4)
    x[-1, 2] = float("inf")
    with pytest.raises(fp.DataError, match="NaN"):
        fp.score(_counted(), [(x[:8], y[:8]), (x[8:], y[8:])], samples_per_class=2, projections=8)


@pytest.mark.parametrize("kwargs,match", [
    ({"samples_per_class": 0}, "samples_per_class"),
    ({"samples_per_class": 1}, "samples_per_class"),
    ({"samples_per_class": -4}, "samples_per_class"),
    ({"samples_per_class": 2.5}, "samples_per_class"),
    ({"samples_per_class": "8"}, "samples_per_class"),
    ({"samples_per_class": None}, "samples_per_class"),
    ({"projections": 0}, "projections"),
    ({"projections": 1.5}, "projections"),
    ({"u_at": "after"}, "u_at"),
    ({"u_reduce": "median"}, "u_reduce"),
    ({"r_reduce": "mean"}, "r_reduce"),
    ({"ignore": ["net.features.1", "no.such.layer"]}, "no.such.layer"),
])
def test_bad_arguments_before_any_forward(kwargs, match):
    model = _counted()
    kwargs.setdefault("projections", 8)
    with pytest.raises(fp.FairPrunerError, match=match):
        fp.score(model, tiny_loader((16,)), **kwargs)
    assert _Counted.calls == 0


def test_alpha_out_of_range_at_plan():
    scores = fp.score(zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4).eval(), tiny_loader((16,)),
                      projections=8)
    for bad in (-0.1, 1.1, float("nan"), True):
        with pytest.raises(fp.PlanError, match="alpha"):
            fp.plan(scores, alpha=bad)


def test_shared_module_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 8)
            self.block = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            h = torch.relu(self.block(h))
            return self.out(torch.relu(self.block(h)))

    with pytest.raises(fp.FairPrunerError):
        fp.score(Shared().eval(), tiny_loader((16,)), projections=8)


def test_layer_applied_twice_is_measured_where_its_output_is_read():
    """U at a layer's output is ambiguous when the layer runs twice per forward; its group is measured at the
    next kind of site (its consumers' inputs), as with u_at="input"."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Linear(16, 8)
            self.mid = nn.Linear(16, 8)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.p(x))
            return self.out(torch.cat([torch.relu(self.mid(torch.cat([h, h], 1))), self.p(x)], 1))

    model, loader = Twice().eval(), tiny_loader((16,))
    out = fp.score(model, loader, projections=8, u_at="output")
    inp = fp.score(model, loader, projections=8, u_at="input")
    torch.testing.assert_close(out["p"].u, inp["p"].u)
    assert not torch.allclose(out["mid"].u, inp["mid"].u)  # mid runs once: measured at its own output


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_score_inside_no_grad_context(ctx):
    model = zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4).eval()
    loader = tiny_loader((16,))
    ref = fp.score(model, loader, projections=8)
    with ctx():
        got = fp.score(model, loader, projections=8)
    assert_scores_equal(ref, got)


# ---------------------------------------------------------------- groups: ignore and output layers

def test_ignore_keeps_a_group_out():
    model = zoo.vgg(cfg=[8, "M", 16, 16], batch_norm=True).eval()
    loader = tiny_loader((3, 8, 8))
    full = fp.score(model, loader, projections=8)
    assert set(full.names) == {"features.0", "features.4", "features.7"}
    s = fp.score(model, loader, projections=8, ignore=["features.4"])
    assert set(s.names) == {"features.0", "features.7"}
    assert s.meta["ignore"] == ["features.4"]
    # Ignoring a coupled member (the BatchNorm after features.0) drops the whole group.
    s2 = fp.score(model, loader, projections=8, ignore=["features.1"])
    assert set(s2.names) == {"features.4", "features.7"}
    # The ignored layer keeps its width after pruning.
    pruned = fp.prune(model, fp.plan(s, alpha=1.0))
    assert pruned.features[4].out_channels == 16
    assert pruned.features[0].out_channels < 8


@pytest.mark.parametrize("family,shape,head", [("mlp", (64,), "classifier"), ("digits_cnn", (1, 8, 8), "classifier"),
                                               ("resnet20", (3, 16, 16), "fc")])
def test_output_layer_is_never_a_group(family, shape, head):
    scores = fp.score(zoo.create(family).eval(), tiny_loader(shape), projections=8)
    assert scores.meta["output_layers"] == [head]
    assert head not in scores.names
    plan = fp.plan(scores, alpha=1.0)
    assert head not in plan.removed


def test_conv_head_output_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    scores = fp.score(net, tiny_loader((3, 8, 8)), projections=8)
    assert "4" not in scores.names
    assert set(scores.names) == {"0", "2"}
    pruned = fp.prune(net, fp.plan(scores, alpha=1.0))
    assert pruned[4].out_channels == 4


# ---------------------------------------------------------------- numerics: R, U and L1 against naive code

def _naive_taylor(model, loader, layer):
    """Per batch: Taylor term of each output unit of ``layer`` (weight row + bias), from autograd."""
    net = copy.deepcopy(model).eval()
    mod = dict(net.named_modules())[layer]
    per_batch = []
    for x, y in loader:
        loss = F.cross_entropy(net(x), y)
        gw, gb = torch.autograd.grad(loss, [mod.weight, mod.bias])
        t = (gw * mod.weight).flatten(1).sum(1) + gb * mod.bias
        per_batch.append((t.detach().double(), len(y)))
    return per_batch


def _plain_conv_chain():
    torch.manual_seed(4)
    return zoo.vgg(cfg=[8, "M", 16], batch_norm=False, num_classes=4).eval()


def test_r_equals_naive_autograd_unequal_batches():
    """With batches of unequal size, R is the reference's |sum_b sum_w dL_b/dw * w| (L_b the batch mean loss)."""
    model = _plain_conv_chain()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1, 3, 1, 2, 0])
    loader = [(x[:5], y[:5]), (x[5:12], y[5:12]), (x[12:], y[12:])]
    scores = fp.score(model, loader, projections=8, r_reduce="sum")
    assert set(scores.names) == {"features.0", "features.3"}
    for layer in scores.names:
        naive = sum(t for t, _ in _naive_taylor(model, loader, layer)).abs()
        got = scores[layer].r.double()
        torch.testing.assert_close(got, naive, rtol=1e-4, atol=1e-6 * float(naive.max()))


def test_r_equals_literal_reference_formula():
    model = _plain_conv_chain()
    loader = tiny_loader((3, 8, 8), per=6, batch=6)
    scores = fp.score(model, loader, projections=8)
    layer = "features.0"
    literal = sum(t for t, _ in _naive_taylor(model, loader, layer)).abs()
    torch.testing.assert_close(scores[layer].r.double(), literal, rtol=1e-4, atol=1e-6 * float(literal.max()))


def test_l1_equals_weight_row_norms():
    model = _plain_conv_chain()
    scores = fp.score(model, tiny_loader((3, 8, 8)), projections=8)
    for layer in scores.names:
        w = dict(model.named_modules())[layer].weight.detach()
        torch.testing.assert_close(scores[layer].l1, w.abs().flatten(1).sum(1))


def _layer_outputs(model, loader, layer):
    """Raw outputs of ``layer`` over the loader (cloned before any in-place activation), and the labels."""
    net = copy.deepcopy(model).eval()
    outs, labels = [], []
    h = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        for x, y in loader:
            net(x)
            labels.append(y)
    h.remove()
    return torch.cat(outs).double(), torch.cat(labels)


def _naive_linear_u(model, loader, layer, samples_per_class):
    """Raw outputs of ``layer`` (cloned before the in-place ReLU), first samples_per_class per class in loader
    order, then the max over class pairs of scipy's exact W1, per unit."""
    out, lab = _layer_outputs(model, loader, layer)
    per_class = {}
    for row, c in zip(out, lab.tolist()):
        if len(per_class.setdefault(c, [])) < samples_per_class:
            per_class[c].append(row)
    per_class = {c: torch.stack(v).numpy() for c, v in per_class.items()}
    u = np.zeros(out.shape[1])
    for j in range(out.shape[1]):
        u[j] = max(wasserstein_distance(per_class[a][:, j], per_class[b][:, j])
                   for a, b in itertools.combinations(sorted(per_class), 2))
    return torch.tensor(u)


def _mlp_case():
    torch.manual_seed(2)
    model = zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4, batch_norm=False).eval()
    g = torch.Generator().manual_seed(3)
    # Unequal class counts, classes interleaved across batches; 3 kept per class.
    y = torch.tensor([0, 1, 2, 0, 3, 1, 0, 2, 3, 0, 1, 2, 3, 3, 0, 1, 2])
    x = torch.randn(len(y), 16, generator=g) + y.view(-1, 1) * 0.3
    loader = [(x[:6], y[:6]), (x[6:11], y[6:11]), (x[11:], y[11:])]
    return model, loader


def test_linear_u_equals_scipy_w1():
    """The stored U of a single-site group is the max class-pair W1 of METHOD.md §1 (exact 1-D case)."""
    model, loader = _mlp_case()
    scores = fp.score(model, loader, projections=8, u_at="output", samples_per_class=3, u_consumer_power=0)
    assert scores.meta["class_counts"] == {"0": 5, "1": 4, "2": 4, "3": 4}
    for layer in ("features.1", "features.3"):
        naive = _naive_linear_u(model, loader, layer, 3)
        torch.testing.assert_close(scores[layer].u.double(), naive, rtol=1e-4, atol=1e-6)
    # samples_per_class matters: with all samples the U values change.
    s_all = fp.score(model, loader, projections=8, u_at="output", samples_per_class=32, u_consumer_power=0)
    naive_all = _naive_linear_u(model, loader, "features.1", 32)
    torch.testing.assert_close(s_all["features.1"].u.double(), naive_all, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(s_all["features.1"].u, scores["features.1"].u)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_u_times_consumer_norm(power):
    """U with ``u_consumer_power`` p is the plain U times, per unit, the L2 norm of the next layer's input
    columns (and the bias-free slices only) to the power p."""
    model, loader = _mlp_case()
    plain = fp.score(model, loader, projections=8, u_at="output", samples_per_class=3, u_consumer_power=0)
    scaled = fp.score(model, loader, projections=8, u_at="output", samples_per_class=3, u_consumer_power=power)
    assert scaled.meta["u_consumer_power"] == power
    mods = dict(model.named_modules())
    for layer, consumer in (("features.1", "features.3"), ("features.3", "classifier")):
        norm = mods[consumer].weight.detach().double().norm(dim=0)
        torch.testing.assert_close(scaled[layer].u.double(), plain[layer].u.double() * norm ** power,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scaled[layer].r, plain[layer].r)


def test_consumer_norm_sums_every_reader_of_a_stream():
    """A residual stream's channel is read by several convolutions: the norm covers all of them."""
    from fairpruner._scoring.reduce import consumer_norms
    from fairpruner._graph import build_graph, discover_groups
    model = zoo.create("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_graph(model, x)
    groups = discover_groups(graph, model)
    mods = dict(model.named_modules())
    stream = next(g for g in groups if g.name == "conv1")  # stage 1: stem, three blocks' conv1 and conv2
    readers = [m.module for m in stream.members if m.side == "in" and m.kind == "weight"]
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
            "layer2.0.shortcut.0"} <= set(readers)
    expected = sum(mods[r].weight.detach().double().square().sum((0, 2, 3)) for r in readers).sqrt()
    torch.testing.assert_close(consumer_norms(stream, mods), expected)


def test_u_site_matters_with_batchnorm():
    model = randomize_norms(zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4, batch_norm=True)).eval()
    loader = tiny_loader((16,))
    a = fp.score(model, loader, projections=8, u_at="output")
    b = fp.score(model, loader, projections=8, u_at="norm")
    assert not torch.allclose(a.groups[0].u, b.groups[0].u)
    assert a.meta["u_at"] == "output" and b.meta["u_at"] == "norm"


def test_scores_shapes_and_ranges():
    model = randomize_norms(zoo.resnet20()).eval()
    scores = fp.score(model, tiny_loader((3, 16, 16)), projections=8, u_reduce="mean", r_reduce="max")
    assert len(scores.groups) > 5
    for g in scores.groups:
        n = g.n_units
        assert g.u.shape == g.r.shape == g.l1.shape == (n,)
        assert g.unit_channels.shape == (n, 1)
        assert sorted(g.unit_channels.flatten().tolist()) == list(range(g.channels))
        for v in (g.u, g.r, g.l1):
            assert bool(torch.isfinite(v).all()) and bool((v >= 0).all())
        assert float(g.u.max()) > 0 and float(g.l1.min()) > 0
    assert scores.meta["n_samples"] == 16
    assert scores.meta["u_reduce"] == "mean" and scores.meta["r_reduce"] == "max"


# ---------------------------------------------------------------- Scores file

def test_scores_save_load_round_trip(tmp_path):
    model = randomize_norms(zoo.digits_cnn()).eval()
    scores = fp.score(model, tiny_loader((1, 8, 8)), projections=8)
    path = tmp_path / "scores.pt"
    scores.save(path)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, dict)
    loaded = fp.Scores.load(path)
    assert_scores_equal(scores, loaded)
    assert loaded.meta == scores.meta
    assert all(a.channels == b.channels for a, b in zip(scores.groups, loaded.groups))
    assert fp.plan(loaded, macs=0.2).removed == fp.plan(scores, macs=0.2).removed
    with pytest.raises(KeyError):
        loaded["no.such.group"]


def test_scores_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something"}, path)
    with pytest.raises(fp.FairPrunerError):
        fp.Scores.load(path)
    model = zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4).eval()
    scores = fp.score(model, tiny_loader((16,)), projections=8)
    scores.save(path)
    d = torch.load(path, weights_only=True)
    d["version"] = 999
    torch.save(d, path)
    with pytest.raises(fp.FairPrunerError, match="newer"):
        fp.Scores.load(path)


def test_sliced_u_equals_naive_loop_with_the_same_directions():
    """Sliced U of a conv layer = max over class pairs of the mean over the seeded directions of scipy's
    1-D W1 between the projected feature maps, computed unit by unit, pair by pair."""
    from fairpruner._scoring.sites import site_seed
    from fairpruner._scoring.wasserstein import random_directions
    model = _plain_conv_chain()
    loader = tiny_loader((3, 8, 8), per=5, batch=7)
    proj = 6
    scores = fp.score(model, loader, projections=proj, seed=11, u_at="output", u_consumer_power=0)
    out, lab = _layer_outputs(model, loader, "features.0")
    dirs = random_directions(out.shape[2] * out.shape[3], proj,
                             torch.Generator().manual_seed(site_seed(11, "features.0", "output"))).double()
    classes = sorted(set(lab.tolist()))
    naive = []
    for j in range(out.shape[1]):
        pts = out[:, j].flatten(1) @ dirs  # (N, P)
        best = 0.0
        for a, b in itertools.combinations(classes, 2):
            pa, pb = pts[lab == a].numpy(), pts[lab == b].numpy()
            best = max(best, float(np.mean([wasserstein_distance(pa[:, p], pb[:, p]) for p in range(proj)])))
        naive.append(best)
    torch.testing.assert_close(scores["features.0"].u.double(), torch.tensor(naive, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


def test_scores_written_before_writers_were_recorded_still_load(tmp_path):
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    scores = fp.score(model, tiny_loader((3, 16, 16)), projections=4)
    path = tmp_path / "s.pt"
    scores.save(path)
    d = torch.load(path, weights_only=True)
    for g in d["groups"]:
        del g["writers"], g["feeds_output"]  # the format as version 1 files without them hold it
    torch.save(d, path)
    old = fp.Scores.load(path)
    assert [g.writers for g in old.groups] == [1] * len(old.groups)
    assert not any(g.feeds_output for g in old.groups)
    assert fp.plan(old, alpha=0.1).removed == fp.plan(scores, alpha=0.1, stream_weight=1,
                                                 stream_floor="free").removed


def test_the_group_the_output_layer_reads_is_marked(tmp_path):
    """ResNet-20: the last stage's stream (rooted at its projection shortcut) is the head's input; a plain
    CNN: its last conv. The mark survives save and load."""
    torch.manual_seed(0)
    scores = fp.score(zoo.resnet20().eval(), tiny_loader((3, 16, 16)), projections=4)
    assert [g.name for g in scores.groups if g.feeds_output] == ["layer3.0.shortcut.0"]
    scores.save(tmp_path / "s.pt")
    assert [g.feeds_output for g in fp.Scores.load(tmp_path / "s.pt").groups] == [g.feeds_output for g in scores.groups]
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    marked = fp.score(cnn, tiny_loader((3, 16, 16), classes=4), projections=4)
    assert [g.name for g in marked.groups if g.feeds_output] == ["3"]


def test_streams_are_groups_several_layers_write_and_several_read():
    """ResNet-20: the stem's and the two projection shortcuts' streams. MobileNetV2: only the projection convs
    whose outputs are added (not the expansion conv a depthwise conv follows). A gated MLP (gate * up -> down):
    two writers, one reader, not a stream."""
    torch.manual_seed(0)
    resnet = fp.score(zoo.resnet20().eval(), tiny_loader((3, 16, 16)), projections=4)
    streams = sorted(g.name for g in resnet.groups if g.is_stream)
    assert streams == ["conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    mobile = fp.score(zoo.mobilenetv2(num_classes=4).eval(), tiny_loader((3, 16, 16)), projections=4)
    streams = sorted(g.name for g in mobile.groups if g.is_stream)
    assert streams and all(n.endswith("conv.6") for n in streams)  # the blocks' projection convs

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down, self.head = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 6), \
                nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.down(F.silu(self.gate(x)) * self.up(x)))

    gated = fp.score(Gated().eval(), tiny_loader((6,), classes=4), projections=4)
    mlp = [g for g in gated.groups if g.channels == 12]
    assert len(mlp) == 1 and not mlp[0].is_stream


def test_scoring_in_place_leaves_grads_flags_and_requires_grad_as_they_were():
    """Scoring runs on the caller's model itself (no copy of its size) and restores it: existing .grad tensors
    (same objects, same values), requires_grad, mixed train/eval flags; the scores equal those of a fresh copy."""
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    randomize_norms(model)
    fresh = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    F.cross_entropy(model(x), torch.arange(4) % 2).backward()  # the caller's gradients, mid-training
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in grads.items()}
    model.layer1.requires_grad_(False)
    model.layer2.train()
    bn_state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = fp.score(model, tiny_loader((3, 16, 16)), projections=4)
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.equal(p.grad, values[n]), n
        assert p.requires_grad == (not n.startswith("layer1.")), n
    assert all(m.training == n.startswith("layer2") for n, m in model.named_modules() if n), "flags restored"
    assert all(torch.equal(v, bn_state[k]) for k, v in model.state_dict().items())
    again = fp.score(fresh, tiny_loader((3, 16, 16)), projections=4)
    for a, b in zip(scores.groups, again.groups):
        assert torch.equal(a.u, b.u) and torch.equal(a.r, b.r), a.name
