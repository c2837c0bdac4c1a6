"""U, R and L1 from fairpruner.score equal naive reference computations: autograd Taylor terms, scipy's W1
unit by unit and pair by pair, weight row norms."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

import fairpruner as fp
from helpers import randomize_norms, tiny_loader
from fairpruner import zoo


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
