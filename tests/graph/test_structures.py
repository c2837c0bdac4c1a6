"""Tests for fairpruner._graph and the surgery's check on structures that need care: a tensor returned beside the
logits, dict outputs, one PReLU slope shared by every channel, InstanceNorm's running statistics, a depthwise
channel multiplier, a split's halves concatenated again, PixelShuffle, a pruned model that does not run, and
bfloat16 models, MACs the cost model cannot see, tied weights. Each is pruned == masked, or refused with a
FairPrunerError that names the fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
from helpers import assert_prune_equals_mask

IMAGE = (3, 8, 8)


def _loader(shape=IMAGE, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, *shape, generator=g).to(dtype), torch.arange(8) % 3) for _ in range(3)]


def _fresh(shape=IMAGE):
    return torch.randn(4, *shape, generator=torch.Generator().manual_seed(7))


def _plan(model, alpha=0.3, **kw):
    torch.manual_seed(0)
    return fp.plan(fp.score(model.eval(), _loader(**kw.pop("data", {})), samples_per_class=4, projections=4,
                            progress=False, **kw), alpha=alpha)


def _head(c):
    return [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]


class _WithEmbedding(nn.Module):
    """Returns an embedding beside the logits, as a tuple or a dict."""

    def __init__(self, as_dict):
        super().__init__()
        self.as_dict = as_dict
        self.c1, self.fc1, self.fc2 = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc1(F.relu(self.c1(x)).mean((2, 3))))
        return {"logits": self.fc2(h), "embedding": h} if self.as_dict else (self.fc2(h), h)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_every_returned_tensor_keeps_its_shape(as_dict):
    torch.manual_seed(0)
    model = _WithEmbedding(as_dict).eval()
    plan = _plan(model, alpha=0.5)
    assert "fc1" not in plan.removed and plan.removed["c1"], "the embedding's layer is kept, the conv is cut"
    pruned, masked = fp.prune(model, plan), fp.mask(model, plan)
    x = _fresh()
    with torch.no_grad():
        got, want = pruned(x), masked(x)
    got, want = (list(got.values()), list(want.values())) if as_dict else (got, want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_weights_returned_keep_their_heads():
    """nn.MultiheadAttention's weights returned beside the logits: its heads stay (the walk stops at the module a
    unit family claims), the rest is pruned."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(4, 16), nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 3)

        def forward(self, x):
            h = self.inp(x)
            a, w = self.attn(h, h, h)
            return self.fc2(F.relu(self.fc1(h + a)).mean(1)), w

    torch.manual_seed(0)
    model = Net().eval()
    plan = _plan(model, alpha=0.5, data={"shape": (6, 4)})
    assert "attn:heads" not in plan.removed and plan.removed["fc1"]
    pruned = fp.prune(model, plan)
    x = _fresh((6, 4))
    with torch.no_grad():
        for a, b in zip(pruned(x), fp.mask(model, plan)(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scaled_logits_keep_their_classifier_beside_another_head():
    """Logits that are no layer's own output (divided by a temperature), with another head called after the
    classifier: the classifier is found on the logits' graph, not taken to be the last layer called."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc, self.proj = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 6), nn.Linear(16, 8)

        def forward(self, x):
            h = F.relu(self.c(x)).mean((2, 3))
            return self.fc(h) / 0.5, self.proj(h)

    torch.manual_seed(0)
    model = Net().eval()
    plan = _plan(model, alpha=0.5)
    assert set(plan.removed) == {"c"} and plan.removed["c"]
    assert fp.prune(model, plan)(_fresh())[0].shape == (4, 6)


def test_a_dict_without_logits_is_refused_clearly():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)

        def forward(self, x):
            return {"scores": self.fc(self.c(x).mean((2, 3)))}

    with pytest.raises(fp.FairPrunerError, match="dict without 'logits'.*scores"):
        _plan(Net())


def test_a_prelu_slope_shared_by_every_channel_stays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(), nn.Conv2d(8, 8, 3, padding=1), *_head(8))
    with torch.no_grad():
        model[1].weight.fill_(0.3)  # far from ReLU's 0, so that a zeroed slope would show
    plan = _plan(model)
    assert plan.removed["0"]
    pruned, _ = assert_prune_equals_mask(model, plan, _fresh())
    assert pruned[1].weight.shape == (1,) and float(pruned[1].weight) == pytest.approx(0.3)


def test_instance_norm_running_statistics_are_cut_with_the_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), *_head(8))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    plan = _plan(model)
    assert plan.removed["0"]
    pruned, _ = assert_prune_equals_mask(model, plan, _fresh())
    norm = pruned[1]
    assert norm.weight.shape == norm.running_mean.shape == norm.running_var.shape == (norm.num_features,)


def test_a_depthwise_channel_multiplier_is_kept_whole():
    """groups = in_channels < out_channels: each input channel feeds two outputs; its groups stay whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(16, 16, 1), *_head(16))
    plan = _plan(model, alpha=0.5)
    assert not plan.removed.get("0") and not plan.removed.get("2") and plan.removed["4"]
    pruned, _ = assert_prune_equals_mask(model, plan, _fresh())
    assert (pruned[2].in_channels, pruned[2].out_channels, pruned[2].groups) == (8, 16, 8)


class _SplitConcat(nn.Module):
    """A CSP / ShuffleNetV2 block: the stem's output split in two, one half through a branch, concatenated again."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.br = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 3)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, 1)
        return self.fc(F.relu(self.fuse(torch.cat([a, self.br(b)], 1))).mean((2, 3)))


def test_a_split_concatenated_again_is_pruned_where_the_coupling_is_sound():
    """torch-pruning couples the branch to the wrong half of the split and of the concatenation (pruning it cut
    the stem and broke the model): that group stays whole; the rest is pruned."""
    torch.manual_seed(0)
    model = _SplitConcat().eval()
    plan = _plan(model, alpha=0.5)
    assert "br.0" not in plan.removed and plan.removed["fuse"]
    pruned, _ = assert_prune_equals_mask(model, plan, _fresh())
    assert pruned.stem[0].out_channels == 16 and pruned.br[0].out_channels == 8


def test_pixel_shuffle_between_layers_is_refused_naming_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2), nn.Conv2d(4, 8, 3, padding=1),
                          *_head(8))
    with pytest.raises(fp.UnsupportedModelError, match=r"PixelShuffle.*add '0' to `ignore=`"):
        _plan(model)
    plan = _plan(model, ignore=["0"])
    assert_prune_equals_mask(model, plan, _fresh())


def test_a_pruned_model_that_does_not_run_is_refused_clearly():
    """A per-channel buffer used in forward() is invisible to the graph; the cut model fails, inside the check."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 3)
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 16).view(1, 16, 1, 1))

        def forward(self, x):
            return self.fc(F.relu(self.c2(F.relu(self.c1(x)) * self.scale)).mean((2, 3)))

    torch.manual_seed(0)
    plan = _plan(Scaled(), alpha=1.0)
    assert plan.removed["c1"]
    with pytest.raises(fp.UnsupportedModelError, match="pruned model does not run.*ignore="):
        fp.prune(Scaled(), plan)


@pytest.mark.parametrize("mixed", [False, True], ids=["bfloat16", "bfloat16-with-float32-head"])
def test_a_bfloat16_model_is_checked_to_its_precision(mixed):
    """bfloat16 rounds the pruned and the masked computation differently (~1e-2 relative): a float32 tolerance
    refused sound plans."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.fc = nn.Linear(4, 16), nn.Linear(16, 3)
            layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

        def forward(self, x):
            return self.fc(self.enc(self.inp(x)).mean(1).to(self.fc.weight.dtype))

    torch.manual_seed(0)
    model = Encoder().to(torch.bfloat16).eval()
    if mixed:  # checked to its least precise dtype
        model.fc.float()
    scores = fp.score(model, _loader((6, 4), torch.bfloat16), samples_per_class=4, projections=4, progress=False)
    plan = fp.plan(scores, macs=0.4)
    pruned = fp.prune(model, plan)
    x = torch.randn(4, 6, 4).bfloat16()
    with torch.no_grad():
        a, b = pruned.float()(x.float()), fp.mask(model, plan).float()(x.float())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same plan is exact in float32


def test_macs_the_plan_could_not_predict_are_said_aloud():
    """Attention written with torch.matmul: its products shrink with the projections, which the cost model does
    not see; the pruned model's MACs are counted and the difference reported."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.q, self.k, self.v = nn.Linear(4, 16), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
            self.o, self.fc = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            x = self.inp(x)
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8 ** 0.5, -1)
            return self.fc((x + self.o(a @ self.v(x))).mean(1))

    torch.manual_seed(0)
    model = Attention().eval()
    plan = fp.plan(fp.score(model, _loader((6, 4)), samples_per_class=4, projections=4, progress=False), alpha=1.0)
    with pytest.warns(UserWarning, match="MACs per sample where the plan predicted"):
        pruned = fp.prune(model, plan)
    assert fp.count_macs(pruned, _fresh((6, 4))) < plan.predicted["macs_after"]


class _Tied(nn.Module):
    """Two layers sharing one weight, each read by its own head, beside an untied branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16)
        self.b.weight = self.a.weight
        self.l2, self.l3, self.l4 = nn.Linear(16, 4), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        return self.l2(torch.relu(self.a(x))) + self.l3(torch.relu(self.b(x))) + self.l4(torch.relu(self.c(x)))


def _tied_plan():
    torch.manual_seed(0)
    model = _Tied().eval()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 8, generator=g), torch.arange(8) % 4) for _ in range(2)]
    return model, fp.plan(fp.score(model, loader, projections=4, progress=False), alpha=0.5)


def test_tied_weights_are_kept_whole_and_the_rest_pruned():
    model, plan = _tied_plan()
    assert [g["name"] for g in plan.groups] == ["c"] and plan.removed["c"]
    pruned = fp.prune(model, plan)
    assert pruned.a.weight is pruned.b.weight and pruned.c.out_features < 16
    assert_prune_equals_mask(model, plan, torch.randn(4, 8), pruned=pruned)


def test_a_plan_that_would_untie_shared_weights_is_refused():
    """A plan edited (or written by another version) to cut a tied layer: surgery would untie it and grow the
    model."""
    model, plan = _tied_plan()
    plan.groups.append({"name": "a", "channels": 16, "units": 16, "unit_size": 1, "removed_channels": [0, 1]})
    plan.removed["a"] = [0, 1]
    with pytest.raises(fp.UnsupportedModelError, match="a.weight and b.weight.*untie"):
        fp.prune(model, plan)
