"""Tests for fairpruner.families.attention_hf on Hugging Face decoders (Llama, Qwen2, Mistral, Phi-3; built from small
configs, no downloads): grouped-query attention pruned by query heads (the default) or by key/value group, the
gated MLP as one group, prune == mask, predicted == counted params/MACs, generate() after pruning, the caller's
model untouched."""
from __future__ import annotations

import pytest
import torch

import fairpruner as fp
from helpers import assert_prune_equals_mask, generated_pruned_and_masked, last_token_loss, rel_err
from fairpruner.families.attention_hf import find_attention

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, LAYERS, INTER, VOCAB, SEQ, CLASSES = 64, 8, 2, 96, 100, 12, 3
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "phi3": "Phi3"}
# Phi-3's default special tokens lie outside the small vocabulary.
EXTRA = {"phi3": dict(bos_token_id=1, eos_token_id=2)}


def decoder(kind="llama", head="ForSequenceClassification", kv_heads=2, impl="eager", seed=0, use_cache=False):
    config = getattr(transformers, FAMILIES[kind] + "Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=64, pad_token_id=0,
        num_labels=CLASSES, attn_implementation=impl, use_cache=use_cache, **EXTRA.get(kind, {}))
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[kind] + head)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial norms and biases, so that every head and unit matters
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else
                    torch.randn(p.shape, generator=g) * 0.2)
    return model


def loader(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    y = torch.arange(n) % CLASSES
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def fresh(n=3, seed=7):
    return torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


KV = {"hf_attention_heads": fp.families.AttentionOptions(gqa="kv_groups")}
CASES = [("llama", "ForSequenceClassification", 2, "eager"), ("llama", "ForCausalLM", 2, "sdpa"),
         ("qwen2", "ForCausalLM", 4, "eager"), ("mistral", "ForSequenceClassification", 8, "sdpa")]
IDS = [f"{k}-{h[3:]}-kv{kv}-{impl}" for k, h, kv, impl in CASES]


@pytest.mark.parametrize("kind,head,kv,impl", CASES, ids=IDS)
def test_decoder_prunes_by_key_value_group_and_equals_mask(kind, head, kv, impl):
    model = decoder(kind, head, kv, impl)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"loss_fn": last_token_loss(CLASSES)} if head == "ForCausalLM" else {}
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False, family_options=KV, **kw)
    groups = {g.name: g for g in scores.groups}
    # One attention group per layer, one unit per key/value head; one gated-MLP group per layer, not a stream.
    for a in find_attention(model):
        assert a.prunable and (a.heads, a.kv_heads, a.per_kv) == (HEADS, kv, HEADS // kv)
        assert groups[f"{a.name}:heads"].n_units == kv
    mlp = [g for n, g in groups.items() if n.endswith("mlp.up_proj")]
    assert len(mlp) == LAYERS and all(g.n_units == INTER and not g.is_stream for g in mlp)
    assert len(groups) == 2 * LAYERS  # the hidden size (RMSNorm, embeddings, residual stream) is kept

    plan = fp.plan(scores, macs=0.45)
    heads_gone = [g for g in plan.groups if g["name"].endswith(":heads") and g["removed_channels"]]
    assert heads_gone, "the plan should remove a key/value group"
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    out = (lambda m: m(x).logits)
    assert rel_err(out(pruned), out(model)) > 1e-3
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]

    # Key/value groups go whole: every kept query head still finds its key/value head.
    modules = dict(pruned.named_modules())
    for g in heads_gone:
        attn = modules[g["name"][:-len(":heads")]]
        kept = kv - len(g["removed_channels"])
        assert attn.k_proj.out_features == attn.v_proj.out_features == kept * attn.head_dim
        assert attn.q_proj.out_features == attn.o_proj.in_features == kept * (HEADS // kv) * attn.head_dim
        assert attn.num_key_value_groups == HEADS // kv
    # The caller's model is untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(a.kv_heads == kv for a in find_attention(model))


@pytest.mark.parametrize("gqa", ["query_heads", "kv_groups"])
def test_pruned_causal_lm_generates_what_the_masked_one_does(gqa):
    model = decoder("llama", "ForCausalLM", 2, "sdpa")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES),
                      family_options={"hf_attention_heads": fp.families.AttentionOptions(gqa=gqa)})
    plan = fp.plan(scores, macs=0.45)
    runs = generated_pruned_and_masked(model, plan, fresh(2, seed=3)[:, :5], 6)
    assert runs[0].shape == (2, 11) and torch.equal(runs[0], runs[1])


def test_a_causal_lm_that_returns_its_cache_scores_prunes_and_reloads(tmp_path):
    """use_cache=True, as checkpoints ship: the output's cache object is not traced (it used to fail inside
    torch-pruning in score, prune and load alike)."""
    model = decoder("llama", "ForCausalLM", 2, "sdpa", use_cache=True)
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES))
    plan = fp.plan(scores, macs=0.45)
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    fp.save(tmp_path / "p.pt", pruned, plan)
    loaded = fp.load(tmp_path / "p.pt", decoder("llama", "ForCausalLM", 2, "sdpa", seed=1, use_cache=True))
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits)


def test_mha_decoder_units_are_single_heads():
    """Without grouped-query attention (as many key/value heads as heads) a unit is one head."""
    model = decoder("llama", kv_heads=HEADS)
    a = find_attention(model)[0]
    assert (a.kv_heads, a.per_kv) == (HEADS, 1)
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False)
    assert scores[f"{a.name}:heads"].n_units == HEADS


def test_phi3_fused_attention_prunes_by_key_value_group():
    """A unit is a key/value head's rows of the fused projection (its query heads, its key head, its value head);
    the kept rows stay in [queries | keys | values] order, and each pruned layer reads its own head counts."""
    model = decoder("phi3", kv_heads=4)
    a = find_attention(model)[0]
    assert a.prunable and (a.heads, a.kv_heads, a.qkv) == (HEADS, 4, (f"{a.name}.qkv_proj",))
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False, family_options=KV)
    assert scores[f"{a.name}:heads"].n_units == 4
    plan = fp.plan(scores, macs=0.45)
    gone = {g["name"][:-len(":heads")]: len(g["removed_channels"]) for g in plan.groups
            if g["name"].endswith(":heads") and g["removed_channels"]}
    assert gone, "the plan should remove a key/value group"
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    modules = dict(pruned.named_modules())
    d = a.head_dim
    for name, n in gone.items():
        attn, kv = modules[name], 4 - n
        assert attn.qkv_proj.out_features == (kv * 2 + 2 * kv) * d and attn.o_proj.in_features == kv * 2 * d
        assert (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.num_key_value_heads) == \
            (2 * kv, kv, kv)
        assert attn.config is not pruned.config and pruned.config.num_attention_heads == HEADS
    assert model.config.num_attention_heads == HEADS and all(a.kv_heads == 4 for a in find_attention(model))


def test_pruned_phi3_generates_what_the_masked_one_does():
    model = decoder("phi3", "ForCausalLM", 4, "sdpa")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES), family_options=KV)
    plan = fp.plan(scores, macs=0.45)
    assert any(g["name"].endswith(":heads") and g["removed_channels"] for g in plan.groups)
    runs = generated_pruned_and_masked(model, plan, fresh(2, seed=3)[:, :5], 6)
    assert runs[0].shape == (2, 11) and torch.equal(runs[0], runs[1])


QUERY_CASES = [("llama", "ForCausalLM", "sdpa"), ("qwen2", "ForSequenceClassification", "eager"),
               ("phi3", "ForCausalLM", "eager")]


@pytest.mark.parametrize("kind,head,impl", QUERY_CASES, ids=[f"{k}-{h[3:]}-{i}" for k, h, i in QUERY_CASES])
def test_query_heads_go_evenly_from_every_key_value_group(kind, head, impl):
    model = decoder(kind, head, 2, impl)  # 8 query heads over 2 key/value heads: 4 per group
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"loss_fn": last_token_loss(CLASSES)} if head == "ForCausalLM" else {}
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False, **kw)  # the default
    for a in find_attention(model):
        g = scores[a.group_name]
        assert tuple(g.unit_channels.shape) == (4, 2)  # unit k: the k-th lowest-U query head of each group
        assert sorted(g.unit_channels.flatten().tolist()) == list(range(HEADS))
        assert all(int(h) // 4 == i for row in g.unit_channels for i, h in enumerate(row))
        assert bool((g.u[1:] >= g.u[:-1]).all())
    plan = fp.plan(scores, alpha=0.5)
    gone = {a.name: plan.removed_channels(a.group_name) for a in find_attention(model)}
    assert any(gone.values()), "the plan should remove query heads"
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    for a in find_attention(pruned):
        removed = torch.tensor(gone[a.name], dtype=torch.long)
        per = torch.bincount(removed // 4, minlength=2)
        assert per[0] == per[1] and a.kv_heads == 2 and a.heads == HEADS - len(removed)
        assert getattr(pruned.get_submodule(a.name), "num_key_value_groups", a.per_kv) == a.per_kv == 4 - per[0]
    if head == "ForCausalLM":
        runs = generated_pruned_and_masked(model, plan, fresh(2, seed=3)[:, :5], 4)
        assert torch.equal(runs[0], runs[1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_query_head_plan_must_cut_every_group_alike():
    model = decoder("llama")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False)
    plan = fp.plan(scores, alpha=0.3)
    name = find_attention(model)[0].group_name
    for g in plan.groups:
        if g["name"] == name:
            g["removed_channels"] = [0]  # one query head of the first group only
    with pytest.raises(fp.PlanError, match="must lose the same number of query heads"):
        fp.prune(model, plan)


def test_one_key_value_head_still_loses_query_heads():
    """Multi-query attention (one key/value head): no key/value group can go, query heads still can."""
    model = decoder("llama", kv_heads=1)
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False)
    plan = fp.plan(scores, macs=0.3)
    assert any(g["name"].endswith(":heads") and g["removed_channels"] for g in plan.groups)
    pruned = fp.prune(model, plan)
    assert_prune_equals_mask(model, plan, fresh(), pruned=pruned)
    assert all(a.kv_heads == 1 and a.heads < HEADS for a in find_attention(pruned))
    kv = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False, family_options=KV)
    assert not any(n.endswith(":heads") for n in kv.names)


def test_options_written_before_query_heads_existed_read_as_key_value_groups():
    opts = fp.families.AttentionOptions.from_dict({"version": 1, "units": "heads"})
    assert opts.gqa == "kv_groups"
    assert fp.families.AttentionOptions.from_dict({"version": 2, "units": "heads", "gqa": "kv_groups"}).gqa == \
        "kv_groups"
    assert fp.families.AttentionOptions().gqa == "query_heads"
