"""Tests for fairpruner.families.attention: attention heads (timm style and nn.MultiheadAttention) as a unit family, the
MLP groups of transformer blocks and the never-pruned residual stream (the replacement module: test_pruned_mha.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
from fairpruner import PrunedMultiheadAttention
from fairpruner.families.attention import find_attention
from fairpruner.zoo import ConvNeXt, VisionTransformer
from helpers import CountingLoader, Scored, assert_prune_equals_mask, fresh_inputs, rel_err, tiny_loader

T, FEATS, DIM, HEADS = 5, 6, 16, 4


def _masks(batch: int):
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    pad = torch.zeros(batch, T, dtype=torch.bool)
    pad[:, -1] = True  # the last position is padding
    return causal, pad


class MHANet(nn.Module):
    """Linear embedding -> nn.MultiheadAttention (causal mask, key padding mask, attention weights) -> mean ->
    Linear. With ``residual`` the embedding is a stream that attention reads and writes."""

    def __init__(self, batch_first: bool = True, residual: bool = False) -> None:
        super().__init__()
        self.batch_first, self.residual = batch_first, residual
        self.emb = nn.Linear(FEATS, DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first)
        self.fc = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        causal, pad = _masks(x.shape[0])
        s = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.attn(s, s, s, key_padding_mask=pad, attn_mask=causal)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.fc((h + a if self.residual else a).mean(1))


class EncoderNet(nn.Module):
    """Linear embedding -> nn.TransformerEncoderLayer -> mean -> Linear.

    norm_first=False: inside an nn.TransformerEncoder (nested-tensor fast path), batch first, key padding mask.
    norm_first=True: a bare layer, sequence first, causal mask.
    """

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.emb = nn.Linear(FEATS, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 32, dropout=0.0, batch_first=not norm_first,
                                           norm_first=norm_first)
        self.enc = layer if norm_first else nn.TransformerEncoder(layer, 1)
        self.fc = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        causal, pad = _masks(x.shape[0])
        if self.norm_first:
            h = self.enc(h.transpose(0, 1), src_mask=causal, is_causal=True).transpose(0, 1)
        else:
            h = self.enc(h, src_key_padding_mask=pad)
        return self.fc(h.mean(1))


def _vit():
    return VisionTransformer(img_size=8, patch_size=4, num_classes=4, embed_dim=12, depth=2, num_heads=3)


SEQ = (T, FEATS)
MODELS = {
    "vit": (_vit, (3, 8, 8)),
    "convnext": (lambda: ConvNeXt(dims=(8, 16), depths=(1, 1), num_classes=4, stem_stride=2, layer_scale_init=1.0),
                 (3, 8, 8)),
    "mha_batch_first": (lambda: MHANet(True), SEQ),
    "mha_seq_first": (lambda: MHANet(False, residual=True), SEQ),
    "encoder_post_norm": (lambda: EncoderNet(False), SEQ),
    "encoder_pre_norm": (lambda: EncoderNet(True), SEQ),
}
# Groups that must be found (by name suffix), and module names that must never be a group's root.
EXPECTED = {
    "vit": ({"blocks.0.attn:heads", "blocks.1.attn:heads", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"},
            {"patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc2"}),
    "convnext": ({"stages.0.0.mlp.fc1", "stages.1.2.mlp.fc1"}, {"stem.0", "stages.1.1", "stages.0.0.conv_dw"}),
    "mha_batch_first": ({"attn:heads"}, {"emb"}),
    "mha_seq_first": ({"attn:heads"}, {"emb"}),
    "encoder_post_norm": ({"enc.layers.0.self_attn:heads", "enc.layers.0.linear1"}, {"emb", "enc.layers.0.linear2"}),
    "encoder_pre_norm": ({"enc.self_attn:heads", "enc.linear1"}, {"emb", "enc.linear2"}),
}
TARGETS = {"alpha": {"alpha": 0.3}, "macs": {"macs": 0.25}, "uniform": {"params": 0.3, "allocation": "uniform"}}
CASES = [(m, t) for m in MODELS for t in TARGETS]
IDS = [f"{m}-{t}" for m, t in CASES]


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so that the stream matters
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def inputs(name: str, n: int = 3, seed: int = 99) -> torch.Tensor:
    return fresh_inputs(MODELS[name][1], n, seed)


scored = Scored(lambda name, attention="heads": (make(name), tiny_loader(MODELS[name][1]), {"attention": attention}),
                TARGETS)
case = scored.case


def heads_of(model: nn.Module) -> dict:
    return {a.name: (a.heads, a.head_dim) for a in find_attention(model)}


# ---------------------------------------------------------------- groups

@pytest.mark.parametrize("name", list(MODELS))
def test_head_and_mlp_groups_found_and_the_stream_never(name):
    _, _, scores = scored(name)
    must, never = EXPECTED[name]
    assert must <= set(scores.names)
    assert not never & set(scores.names)
    for g in scores.groups:
        if g.name.endswith(":heads"):
            assert g.n_units == g.channels == heads_of(scored(name)[0])[g.name[:-6]][0]
            assert bool(torch.isfinite(g.u).all()) and bool((g.u > 0).all()) and bool((g.r >= 0).all())


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize("name,target", CASES, ids=IDS)
def test_prune_shrinks_equals_mask_and_meets_predictions(name, target):
    model, scores, plan, pruned = case(name, target=target)
    x = inputs(name)
    assert plan.units_removed > 0
    assert fp.count_params(pruned) < fp.count_params(model)
    assert fp.count_macs(pruned, x) < fp.count_macs(model, x)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    assert fp.count_macs(model, x) == plan.predicted["macs_before"]
    _, masked = assert_prune_equals_mask(model, plan, x, pruned=pruned)
    with torch.no_grad():
        assert rel_err(model(x), masked(x)) > 1e-4  # the removed units mattered
    before, after = heads_of(model), heads_of(pruned)
    for spec in plan.groups:
        if spec["name"].endswith(":heads"):
            attn = spec["name"][:-6]
            assert after[attn] == (before[attn][0] - len(spec["removed_channels"]), before[attn][1])


@pytest.mark.parametrize("name", [m for m in MODELS if m != "convnext"])
def test_uniform_plan_removes_heads_everywhere(name):
    model, _, plan, pruned = case(name, target="uniform")
    before, after = heads_of(model), heads_of(pruned)
    assert before.keys() == after.keys()
    assert all(after[k][0] < before[k][0] for k in before)
    for k, (heads, head_dim) in after.items():
        m = pruned.get_submodule(k)
        assert m.num_heads == heads
        # The inner width follows the head count; the residual stream keeps its width.
        proj = m.proj if hasattr(m, "proj") else m.out_proj
        assert proj.in_features == heads * head_dim and proj.out_features == proj.weight.shape[0]
    if name.startswith(("mha", "encoder")):
        assert all(isinstance(pruned.get_submodule(k), PrunedMultiheadAttention) for k in after)
        assert all(isinstance(model.get_submodule(k), nn.MultiheadAttention) for k in before)


@pytest.mark.parametrize("name", ["vit", "mha_seq_first", "encoder_post_norm"])
def test_callers_model_unchanged(name):
    model = make(name)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    scores = fp.score(model, tiny_loader(MODELS[name][1]), projections=4)
    plan = fp.plan(scores, params=0.3, allocation="uniform")
    fp.prune(model, plan)
    fp.mask(model, plan)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    assert getattr(model, "enc", None) is None or getattr(model.enc, "use_nested_tensor", True)


@pytest.mark.parametrize("name", ["vit", "mha_seq_first", "encoder_post_norm", "encoder_pre_norm"])
def test_save_load_round_trip(name, tmp_path):
    _, _, plan, pruned = case(name, target="uniform")
    fp.save(tmp_path / "m.pt", pruned, plan)
    fresh = make(name, seed=1)  # another init: the weights must come from the file
    loaded = fp.load(tmp_path / "m.pt", fresh)
    assert heads_of(fresh) == heads_of(make(name))  # not modified
    assert heads_of(loaded) == heads_of(pruned)
    x = inputs(name)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_second_round_on_the_replacement(tmp_path):
    """prune -> re-score (now PrunedMultiheadAttention) -> prune again; save/load replays both rounds."""
    _, _, _, once = case("encoder_pre_norm", target="uniform")
    s2 = fp.score(once, tiny_loader(SEQ, seed=1), projections=4)
    assert "enc.self_attn:heads" in s2.names
    plan2 = fp.plan(s2, params=0.3, allocation="uniform")
    twice = fp.prune(once, plan2)
    assert heads_of(twice)["enc.self_attn"][0] < heads_of(once)["enc.self_attn"][0]
    assert fp.count_macs(twice, inputs("encoder_pre_norm")) == plan2.predicted["macs_after"]
    fp.save(tmp_path / "m.pt", twice, plan2)
    loaded = fp.load(tmp_path / "m.pt", make("encoder_pre_norm"))
    x = inputs("encoder_pre_norm")
    with torch.no_grad():
        assert torch.equal(loaded(x), twice(x))
    assert_prune_equals_mask(once, plan2, x, pruned=twice)


# ---------------------------------------------------------------- head dimensions

@pytest.mark.parametrize("name", ["vit", "mha_seq_first", "encoder_post_norm"])
def test_head_dims_keep_heads_and_scale(name):
    model, scores, plan, pruned = case(name, "head_dims", target="uniform")
    assert all(n.endswith(":head_dims") or ":" not in n for n in scores.names)
    assert plan.settings["scoring"]["family_options"]["attention_heads"] == {"version": 3, "units": "head_dims",
                                                                             "gqa": "query_heads"}
    before, after = heads_of(model), heads_of(pruned)
    for k, (heads, head_dim) in before.items():
        assert after[k][0] == heads and after[k][1] < head_dim
        m = pruned.get_submodule(k)
        assert m.scale == pytest.approx(head_dim ** -0.5)  # the original softmax scale
    x = inputs(name)
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    # load restores the mode from the plan
    again = fp.prune(make(name), fp.Plan.from_json(plan.to_json()), verify=False)
    assert heads_of(again) == after


class DecoderNet(nn.Module):
    """nn.TransformerDecoderLayer: causal self-attention, and cross-attention to a shorter memory."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mem = nn.Linear(FEATS, DIM), nn.Linear(FEATS, DIM)
        self.dec = nn.TransformerDecoderLayer(DIM, HEADS, 32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal, _ = _masks(x.shape[0])
        return self.fc(self.dec(self.emb(x), self.mem(x[:, :3]), tgt_mask=causal).mean(1))


def test_decoder_self_and_cross_attention():
    torch.manual_seed(0)
    model = DecoderNet().eval()
    scores = fp.score(model, tiny_loader(SEQ), projections=4)
    assert {"dec.self_attn:heads", "dec.multihead_attn:heads", "dec.linear1"} <= set(scores.names)
    plan = fp.plan(scores, params=0.3, allocation="uniform")
    pruned = fp.prune(model, plan)
    after = heads_of(pruned)
    assert after.keys() == {"dec.self_attn", "dec.multihead_attn"}
    assert all(h < HEADS and d == DIM // HEADS for h, d in after.values())
    x = inputs("mha_batch_first")
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert_prune_equals_mask(model, plan, x, pruned=pruned)


# ---------------------------------------------------------------- U where it belongs

def test_sequence_first_scores_like_batch_first():
    """The same weights laid out batch-first and sequence-first give the same scores (the MLP groups' U reads
    sequence-first tensors, the heads' U is recomputed inside nn.MultiheadAttention)."""
    torch.manual_seed(0)
    a = nn.TransformerEncoderLayer(DIM, HEADS, 32, dropout=0.0, batch_first=True).eval()
    b = copy.deepcopy(a)
    b.self_attn.batch_first = False

    class Wrap(nn.Module):
        def __init__(self, layer, seq_first):
            super().__init__()
            self.emb, self.layer, self.fc, self.seq_first = nn.Linear(FEATS, DIM), layer, nn.Linear(DIM, 4), seq_first

        def forward(self, x):
            h = self.emb(x)
            h = self.layer(h.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.layer(h)
            return self.fc(h.mean(1))

    torch.manual_seed(1)
    wa = Wrap(a, False)
    wb = copy.deepcopy(wa)
    wb.layer, wb.seq_first = b, True
    loader = tiny_loader(SEQ)
    sa, sb = fp.score(wa, loader, projections=8), fp.score(wb, loader, projections=8)
    assert sa.names == sb.names and "layer.self_attn:heads" in sa.names
    for ga, gb in zip(sa.groups, sb.groups):
        torch.testing.assert_close(ga.u, gb.u, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ga.r, gb.r, rtol=1e-4, atol=1e-7)


def test_mha_scores_like_its_replacement():
    """U recomputed inside nn.MultiheadAttention equals U read at the replacement's output projection."""
    model = make("mha_batch_first")
    twin = copy.deepcopy(model)
    twin.attn = PrunedMultiheadAttention.from_mha(model.attn, torch.arange(DIM), HEADS, DIM // HEADS, range(HEADS))
    loader = tiny_loader(SEQ)
    sa = fp.score(model, loader, projections=8, r_reduce="sum")
    sb = fp.score(twin, loader, projections=8, r_reduce="sum")
    torch.testing.assert_close(sa["attn:heads"].u, sb["attn:heads"].u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sa["attn:heads"].r, sb["attn:heads"].r, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- refused attention

class _CrossNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mem = nn.Linear(FEATS, DIM), nn.Linear(FEATS, 8)
        self.attn = nn.MultiheadAttention(DIM, HEADS, kdim=8, vdim=8, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(DIM, 12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x):
        m = self.mem(x)
        return self.fc(self.attn(self.emb(x), m, m)[0].mean(1))


class _GQA(nn.Module):
    """timm-style names, but one key/value head for two query heads."""

    def __init__(self):
        super().__init__()
        self.num_heads = 2
        self.qkv = nn.Linear(DIM, DIM + DIM)  # q: 2 heads of 8; k, v: 1 head of 8
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        q, k, v = self.qkv(x).split([DIM, 8, 8], -1)
        b, t = x.shape[:2]
        q = q.view(b, t, 2, 8).transpose(1, 2)
        k, v = (z.view(b, t, 1, 8).transpose(1, 2).expand(-1, 2, -1, -1) for z in (k, v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, DIM))


class _GQANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn = nn.Linear(FEATS, DIM), _GQA()
        self.fc = nn.Sequential(nn.Linear(DIM, 12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x):
        return self.fc(self.attn(self.emb(x)).mean(1))


@pytest.mark.parametrize("model,what", [(_CrossNet(), "kdim=8"), (_GQANet(), "grouped-query")])
def test_unsupported_attention_refused_before_scoring(model, what):
    loader = CountingLoader(tiny_loader(SEQ))
    with pytest.raises(fp.UnsupportedModelError, match=what) as err:
        fp.score(model.eval(), loader, projections=4)
    assert "ignore=" in str(err.value) and "'attn'" in str(err.value)
    assert loader.drawn <= 1
    # Ignored, it stays as it is and the rest is still pruned.
    scores = fp.score(model.eval(), tiny_loader(SEQ), projections=4, ignore=["attn"])
    assert "fc.0" in scores.names and not any(":" in n for n in scores.names)


def test_head_dims_refused_with_qk_norm():
    model = _vit()
    for blk in model.blocks:
        blk.attn.q_norm, blk.attn.k_norm = nn.LayerNorm(4), nn.LayerNorm(4)
    with pytest.raises(fp.UnsupportedModelError, match="head_dim"):
        fp.score(model.eval(), tiny_loader((3, 8, 8)), projections=4, attention="head_dims")


def test_unknown_attention_option():
    with pytest.raises(fp.FairPrunerError, match="attention"):
        fp.score(_vit().eval(), tiny_loader((3, 8, 8)), attention="tokens")
