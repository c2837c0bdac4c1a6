"""Tests for fairpruner.families.attention_hf: attention heads and feed-forward units of Hugging Face BERT and ViT
models (built from small configs, no downloads): groups, prune == mask, predicted == counted params/MACs, the head
bookkeeping (module attributes, config.pruned_heads), eager and SDPA attention, masks, save/load."""
from __future__ import annotations

import copy

import pytest
import torch

import fairpruner as fp
from helpers import Scored, assert_prune_equals_mask, rel_err
from fairpruner.families.attention_hf import HFAttentionHeads, _layer_index, _record_pruned_heads, find_attention

transformers = pytest.importorskip("transformers")

HEADS, LAYERS, HIDDEN, SEQ, CLASSES = 4, 2, 64, 16, 3


def _randomize(model, seed=0):
    """Non-trivial weights everywhere (biases and LayerNorms too), so that every head and unit matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.25 if p.dim() > 1 else 0.2))
    return model.eval()


def bert(impl="eager", seed=0):
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=128, max_position_embeddings=32,
                                     num_labels=CLASSES, attn_implementation=impl)
    torch.manual_seed(seed)
    return _randomize(transformers.BertForSequenceClassification(config), seed)


def vit(impl="sdpa", seed=0):
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=128,
                                    num_labels=CLASSES, attn_implementation=impl)
    torch.manual_seed(seed)
    return _randomize(transformers.ViTForImageClassification(config), seed)


def inputs(kind, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "bert":
        return torch.randint(0, 100, (n, SEQ), generator=g)
    return torch.randn(n, 3, 32, 32, generator=g)


def loader(kind, mask=False):
    x = inputs(kind)
    y = torch.arange(CLASSES).repeat_interleave(len(x) // CLASSES)
    if mask:  # padded sequences: sample i keeps its first 8 + i % 8 tokens
        m = (torch.arange(SEQ) < (8 + torch.arange(len(x)) % 8)[:, None]).long()
        return [((x[i:i + 8], m[i:i + 8]), y[i:i + 8]) for i in range(0, len(y), 8)]
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(y), 8)]


MODELS = {"bert": bert, "vit": vit}
TARGETS = {"alpha": {"alpha": 0.3}, "macs": {"macs": 0.35}}
scored = Scored(lambda kind: (MODELS[kind](), loader(kind), {}), TARGETS, snapshot=True)
case = scored.case


def logits(model, x):
    with torch.no_grad():
        return model(*x).logits if isinstance(x, tuple) else model(x).logits



def heads_of(model):
    return {a.name: a.heads for a in find_attention(model)}


def removed_heads(plan):
    """Removed heads per layer index, from the plan."""
    return {_layer_index(g["name"][:-len(":heads")]): sorted(g["removed_channels"])
            for g in plan.groups if g["name"].endswith(":heads") and g["removed_channels"]}


# ---------------------------------------------------------------- groups and scores

@pytest.mark.parametrize("kind", MODELS)
def test_scores_have_head_and_intermediate_groups(kind):
    model, _, scores = scored(kind)
    names = {g.name: g for g in scores.groups}
    attention = find_attention(model)
    assert len(attention) == LAYERS and all(a.prunable and a.heads == HEADS for a in attention)
    for a in attention:
        g = names[a.group_name]
        assert g.n_units == HEADS and g.unit_channels.shape == (HEADS, 1)
        assert torch.isfinite(g.u).all() and bool((g.u > 0).all()) and bool((g.r > 0).all())
    ffn = sorted(n for n in names if n.endswith(("intermediate.dense", "mlp.fc1")))  # transformers 4 | 5 names
    assert len(ffn) == LAYERS and all(names[n].n_units == 128 for n in ffn)
    # The hidden (residual) stream is LayerNorm-coupled: no group may cut it, and the output layer stays.
    assert not any(g.channels == HIDDEN and not g.name.endswith(":heads") and "pooler" not in g.name
                   for g in scores.groups)
    assert "classifier" not in names


def test_head_members_and_attention_macs_terms():
    model = bert()
    x = (inputs("bert", 2),)
    groups = {g.name: g for g in HFAttentionHeads().discover(model, None, x, ())}
    g = groups["bert.encoder.layer.0.attention.self:heads"]
    assert [(m.module.rsplit(".", 2)[-2:], m.side) for m in g.members] == [
        (["self", "query"], "out"), (["self", "key"], "out"), (["self", "value"], "out"),
        (["output", "dense"], "in")]
    assert torch.equal(g.members[0].index[1], torch.arange(16, 32))  # head 1 = rows 16..31 (head_dim 16)
    # q k^T and attention x v of one sample: 2 * heads * L * L * head_dim MACs, counted by count_macs too.
    (macs, axis, other), = HFAttentionHeads().macs_terms(model, x, g)
    assert macs == 2 * HEADS * SEQ * SEQ * (HIDDEN // HEADS)
    assert axis == ("bert.encoder.layer.0.attention.output.dense", 1) and other is None  # the heads' columns
    linear = sum(m.in_features * m.out_features * (SEQ if "pooler" not in n and "classifier" not in n else 1)
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert fp.count_macs(model, x) == linear + LAYERS * macs
    with pytest.raises(fp.UnsupportedModelError, match="whole heads only"):
        fp.score(model, loader("bert"), attention="head_dims")
    # An ignored projection protects its heads.
    ignored = HFAttentionHeads().discover(model, None, x, ("bert.encoder.layer.1.attention.output.dense",))
    assert [g.name for g in ignored] == ["bert.encoder.layer.0.attention.self:heads"]


# ---------------------------------------------------------------- the matrix

CASES = [(k, t) for k in MODELS for t in TARGETS]


@pytest.mark.parametrize("kind,target", CASES, ids=[f"{k}-{t}" for k, t in CASES])
def test_prune_equals_mask_and_predictions(kind, target):
    model, scores, plan, pruned = case(kind, target=target)
    gone = removed_heads(plan)
    assert gone, "the plan should remove at least one head"
    assert plan.units_removed > sum(len(v) for v in gone.values())  # feed-forward units go too
    # Head bookkeeping: module attributes and the config's record (original numbering).
    for a in find_attention(pruned):
        layer = _layer_index(a.name)
        kept = HEADS - len(gone.get(layer, []))
        assert a.heads == kept
        mod = dict(pruned.named_modules())[a.name]
        assert getattr(mod, "all_head_size", kept * a.head_dim) == kept * a.head_dim
        # The softmax scale follows head_dim, which stays (transformers 4 computes it from attention_head_size).
        assert getattr(mod, "scaling", a.head_dim ** -0.5) == a.head_dim ** -0.5 and a.head_dim == HIDDEN // HEADS
        assert dict(pruned.named_modules())[a.out].in_features == kept * a.head_dim
    assert pruned.config.num_attention_heads == HEADS
    assert pruned.config.pruned_heads == gone
    # pruned == masked on fresh inputs, and the cut matters (the comparison is not vacuous).
    x = inputs(kind, 5, seed=7)
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert rel_err(logits(pruned, x), logits(model, x)) > 1e-3
    # Predicted params/MACs equal the counted ones, attention products included.
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    assert fp.count_macs(model, x) == plan.predicted["macs_before"]
    if target == "macs":
        assert plan.predicted["macs_after"] <= 0.655 * plan.predicted["macs_before"]
    # The caller's model and config are untouched.
    assert heads_of(model) == {a.name: HEADS for a in find_attention(model)}
    assert not getattr(model.config, "pruned_heads", None)
    assert all(torch.equal(v, scored.state_before(kind)[k]) for k, v in model.state_dict().items())


def test_masking_a_head_is_zeroing_its_value_rows():
    """An oracle independent of fp.mask: zeroing a head's value rows and bias silences the head."""
    model, _, plan, pruned = case("bert", target="macs")
    oracle = copy.deepcopy(model)
    modules = dict(oracle.named_modules())
    with torch.no_grad():
        for layer, heads in removed_heads(plan).items():
            value = modules[f"bert.encoder.layer.{layer}.attention.self.value"]
            for h in heads:
                value.weight[h * 16:(h + 1) * 16] = 0
                value.bias[h * 16:(h + 1) * 16] = 0
        for g in plan.groups:  # feed-forward and pooler units: zero the producer rows (gelu(0) = tanh(0) = 0)
            if not g["name"].endswith(":heads") and g["removed_channels"]:
                dense = modules[g["name"]]
                dense.weight[g["removed_channels"]] = 0
                dense.bias[g["removed_channels"]] = 0
    x = inputs("bert", 4, seed=3)
    assert rel_err(logits(pruned, x), logits(oracle, x)) < 1e-5


@pytest.mark.parametrize("kind,impl", [("bert", "sdpa"), ("vit", "eager")])
def test_other_attention_implementation(kind, impl):
    """The plan scored on one attention path prunes the other exactly (head_dim and scale unchanged)."""
    _, _, plan, _ = case(kind, target="macs")
    model = MODELS[kind](impl)
    assert model.config._attn_implementation == impl
    pruned = fp.prune(model, plan)  # verifies pruned == masked on the plan's recorded input shapes
    x = inputs(kind, 4, seed=5)
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]


def test_bert_with_attention_mask():
    """Scoring, planning and pruning with (input_ids, attention_mask) inputs; the default example inputs are
    integer zeros of the recorded shapes."""
    model = bert()
    scores = fp.score(model, loader("bert", mask=True), projections=8)
    assert [d["dtype"] for d in scores.meta["example_inputs"]] == ["int64", "int64"]
    plan = fp.plan(scores, macs=0.35)
    assert removed_heads(plan)
    pruned = fp.prune(model, plan)
    ids, mask = loader("bert", mask=True)[1][0]
    assert int(mask.sum()) < mask.numel()
    assert_prune_equals_mask(model, plan, (ids, mask), pruned=pruned)
    assert rel_err(logits(pruned, (ids, mask)), logits(pruned, ids)) > 1e-4  # the mask reaches the attention


# ---------------------------------------------------------------- save / load and later rounds

@pytest.mark.parametrize("kind", MODELS)
def test_save_load_round_trip(kind, tmp_path):
    model, _, plan, pruned = case(kind, target="macs")
    path = tmp_path / "pruned.pt"
    fp.save(path, pruned, plan)
    fresh = type(model)(copy.deepcopy(model.config))  # same config, other weights
    loaded = fp.load(path, fresh).eval()  # a model built from a config starts in train mode (dropout)
    x = inputs(kind, 3, seed=11)
    assert torch.equal(logits(loaded, x), logits(pruned, x))
    assert heads_of(loaded) == heads_of(pruned)
    assert loaded.config.pruned_heads == pruned.config.pruned_heads
    assert heads_of(fresh) == {n: HEADS for n in heads_of(fresh)}  # load does not modify its argument


def test_second_round_records_original_head_numbers():
    model, _, plan, pruned = case("bert", target="macs")
    scores = fp.score(pruned, loader("bert"), projections=8)
    again = fp.prune(pruned, fp.plan(scores, macs=0.3))
    first, record = removed_heads(plan), again.config.pruned_heads
    for layer in range(LAYERS):
        assert set(first.get(layer, [])) <= set(record.get(layer, []))
        assert HEADS - len(record.get(layer, [])) == heads_of(again)[f"bert.encoder.layer.{layer}.attention.self"]
    assert pruned.config.pruned_heads == first  # the first round's model is unchanged


def test_record_pruned_heads_maps_to_original_numbering():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_attention_heads": 6, "pruned_heads": {3: [1, 4]}})()
            self.pruned_heads = {1, 4}
    attn = Attn()
    # Layer 3 now has heads 0, 2, 3, 5 (original numbers); cutting current heads 1 and 3 removes 2 and 5.
    _record_pruned_heads({"enc.layer.3.attn": attn}, "enc.layer.3.attn", attn.config, 4, [1, 3])
    assert attn.config.pruned_heads == {3: [1, 2, 4, 5]} and attn.pruned_heads == {1, 2, 4, 5}


def test_pruned_heads_are_not_recorded_where_the_model_cannot_replay_them():
    """transformers 4 replays config.pruned_heads when a model is built through prune_heads, which decoders do not
    implement (their base model has no _prune_heads): recording there would break building from the config."""
    class Base(torch.nn.Module):
        pass

    class Root(torch.nn.Module):
        def __init__(self, replays):
            super().__init__()
            self.base_model = Base()
            if replays:
                self.base_model._prune_heads = lambda heads: None
            self.config = type("C", (), {"pruned_heads": {}})()

        def prune_heads(self, heads):
            pass

    for replays in (False, True):
        root = Root(replays)
        _record_pruned_heads({"": root, "layers.0.attn": torch.nn.Module()}, "layers.0.attn", root.config, 4, [1])
        assert root.config.pruned_heads == ({0: [1]} if replays else {})


def test_unknown_attention_layout_is_protected():
    """DistilBERT's attention (q_lin/k_lin/v_lin/out_lin, n_heads) is not a known layout: its projections are kept
    whole (torch-pruning alone would cut single head dimensions and break the head reshape); the rest prunes."""
    config = transformers.DistilBertConfig(vocab_size=100, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=128,
                                           max_position_embeddings=32, num_labels=CLASSES)
    torch.manual_seed(0)
    model = _randomize(transformers.DistilBertForSequenceClassification(config))
    assert [a.prunable for a in find_attention(model)] == [False] * LAYERS
    scores = fp.score(model, loader("bert"), projections=8)
    assert not any("attention" in g.name for g in scores.groups)
    plan = fp.plan(scores, macs=0.3)
    pruned = fp.prune(model, plan)
    x = inputs("bert", 3, seed=2)
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"] < plan.predicted["macs_before"]


def test_swin_heads_take_their_relative_position_bias_columns():
    """Swin's per-head relative position bias table loses the columns of the removed heads."""
    config = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                                     num_heads=[4, 4], window_size=4, num_labels=CLASSES)
    torch.manual_seed(0)
    model = _randomize(transformers.SwinForImageClassification(config))
    scores = fp.score(model, loader("vit"), samples_per_class=4, projections=8, progress=False)
    heads = [g for g in scores.groups if g.name.endswith(":heads")]
    assert len(heads) == 2 and all(g.n_units == 4 for g in heads)
    plan = fp.plan(scores, params=0.5, allocation="uniform")
    pruned = fp.prune(model, plan)
    x = inputs("vit", 3, seed=2)
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    for g in plan.groups:
        if g["name"].endswith(":heads"):
            attn = pruned.get_submodule(g["name"][:-len(":heads")])
            kept = 4 - len(g["removed_channels"])
            assert kept < 4 and attn.relative_position_bias.relative_position_bias_table.shape[1] == kept
            assert attn.num_attention_heads == kept
