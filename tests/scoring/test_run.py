"""Tests for fairpruner._scoring.run: the caller's model is never changed (nor its gradients, flags or
requires_grad), the same seed gives the same scores, and bad data or arguments fail before any forward pass."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from helpers import assert_scores_equal, assert_unchanged, randomize_norms, snapshot, tiny_loader
from fairpruner import zoo


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


@pytest.mark.parametrize("loader", [iter([]), [], DataLoader(TensorDataset(torch.zeros(0, 16),
                                                                        torch.zeros(0, dtype=torch.long)))])
def test_empty_loader(loader):
    with pytest.raises(fp.DataError, match="The loader is empty"):
        fp.score(_counted(), loader, projections=8)


def test_inputs_must_be_batch_first_one_row_per_label():
    """A (time, batch, features) input would be cut along time for per-sample MACs and U's samples: refused."""
    x, y = torch.randn(10, 8, 16), torch.arange(8) % 2
    with pytest.raises(fp.DataError, match="batch-first"):
        fp.score(_counted(), [(x, y)], projections=8)
    assert _Counted.calls == 0


def test_a_dataset_instead_of_a_loader_is_named():
    x, y = _xy([0, 1] * 4)
    with pytest.raises(fp.DataError, match="DataLoader"):
        fp.score(_counted(), TensorDataset(x, y), projections=8)
    assert _Counted.calls == 0


def test_global_rng_untouched_by_a_shuffling_dataloader():
    """A DataLoader draws its seeds from the global RNG when iterated; scoring gives the caller's state back."""
    x, y = _xy([0, 1, 2, 3] * 8)
    loader, model = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), _counted()
    state = torch.get_rng_state()
    fp.score(model, loader, projections=8, samples_per_class=4)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("device,match", [("foo", "Unknown device 'foo'"), ("cuda:99", "'cuda:99' asked for")])
def test_a_device_this_machine_lacks_is_refused_before_any_forward(device, match):
    x, y = _xy([0, 1] * 4)
    with pytest.raises(fp.FairPrunerError, match=match):
        fp.score(_counted(), [(x, y)], projections=8, device=device)
    assert _Counted.calls == 0


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


def test_numpy_integers_are_integers_and_other_seeds_are_refused_up_front():
    loader = tiny_loader((1, 8, 8))
    torch.manual_seed(0)
    model = zoo.digits_cnn().eval()
    a = fp.score(model, loader, samples_per_class=np.int64(4), projections=np.int32(8), seed=np.int64(3),
                 progress=False)
    b = fp.score(model, loader, samples_per_class=4, projections=8, seed=3, progress=False)
    assert_scores_equal(a, b)
    for bad in (1.5, None, True):
        with pytest.raises(fp.FairPrunerError, match="seed must be an integer"):
            fp.score(model, loader, seed=bad)


def test_labels_a_target_transform_changes_are_read_from_the_loader():
    """The dataset's raw targets (0, 2..9: class 1 missing) are not what the loader yields (0..3): no up-front
    check on them (it refused the missing class)."""
    class Folded(TensorDataset):
        target_transform = staticmethod(lambda y: y % 4)

        def __init__(self, x, y):
            super().__init__(x, y)
            self.targets = y

        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, self.target_transform(y)

    g = torch.Generator().manual_seed(0)
    raw = torch.arange(64) % 10
    data = Folded(torch.randn(64, 1, 8, 8, generator=g), torch.where(raw == 1, 5, raw))
    scores = fp.score(zoo.digits_cnn().eval(), DataLoader(data, batch_size=16), samples_per_class=4,
                      projections=8, progress=False)
    assert sorted(scores.meta["class_counts"]) == ["0", "1", "2", "3"]


def test_a_dataloader_over_an_iterable_dataset_is_read_without_a_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            return iter([(torch.randn(1, 8, 8, generator=g), k % 3) for k in range(24)])

    loader = DataLoader(Stream(), batch_size=8)
    scores = fp.score(zoo.digits_cnn().eval(), loader, samples_per_class=4, projections=8, progress=True)
    assert scores.meta["n_samples"] == 24
    assert 0 <= fp.evaluate(zoo.digits_cnn().eval(), loader, progress=True) <= 1
