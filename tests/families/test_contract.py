"""Tests for fairpruner.families: one contract for every registered unit family, on each family's example
models: score -> plan -> prune and mask; pruned == masked, predicted params/MACs == counted, the family's own
groups lose units, and the caller's model is untouched. A registered family without an example case fails here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fairpruner as fp
from fairpruner import families, zoo
from fairpruner._graph import build_graph, discover_groups, find_output_layers
from helpers import assert_prune_equals_mask, assert_unchanged, snapshot

CLASSES = 3


def _rnn(name):
    torch.manual_seed(0)
    return zoo.create(name, num_classes=CLASSES).eval(), zoo.example_input(name, 24), {}


def _moe(units):
    # One block: pruning the hidden units of a block changes the routing of the blocks after it, whose MACs
    # then follow the routing (bounded, not exact; see families/experts.py). Whole experts keep every MAC.
    torch.manual_seed(0)
    model = zoo.moe_classifier(depth=1 if units == "hidden" else 2, num_classes=CLASSES).eval()
    x = zoo.example_input("moe_classifier", 24)
    return model, x, ({"ignore": fp.moe_routers(model)} if units == "hidden" else {})


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(16 * 6, CLASSES)).eval()
    return model, torch.randn(24, 6, 16, generator=torch.Generator().manual_seed(0)), {}


def _vit():
    torch.manual_seed(0)
    model = zoo.vit_tiny_cifar(num_classes=CLASSES).eval()
    return model, torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)), {}


def _hf(kind: str, head: str = "ForSequenceClassification", low: int = 1, **config):
    """A Hugging Face model from a small config of ``kind`` (random weights) and 24 inputs: token ids in
    [low, 50) for a text model, 32 x 32 images for an image classifier."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = getattr(transformers, kind + head)(getattr(transformers, kind + "Config")(num_labels=CLASSES, **config))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 32, 32, generator=g) if head == "ForImageClassification" else \
        torch.randint(low, 50, (24, 10), generator=g)
    return model.eval(), x, {}


DECODER = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=16, pad_token_id=0, use_cache=False)


def _bert():
    return _hf("Bert", low=0, vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=16)


def _llama():
    return _hf("Llama", intermediate_size=64, **DECODER)


def _gpt2():
    return _hf("GPT2", vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, pad_token_id=0, use_cache=False)


def _mixtral():
    model, x, kw = _hf("Mixtral", intermediate_size=48, num_local_experts=6, num_experts_per_tok=2, **DECODER)
    with torch.no_grad():
        for layer in model.model.layers:  # routers with real preferences
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model, x, kw


def _mixtral_hidden():
    model, x, _ = _mixtral()
    return model, x, {"ignore": fp.moe_routers(model)}


def _phi3():
    return _hf("Phi3", low=3, intermediate_size=48, bos_token_id=1, eos_token_id=2, **DECODER)


def _levit():
    return _hf("Levit", "ForImageClassification", image_size=32, hidden_sizes=[32, 48, 64],
               num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[8, 8, 8])


# family name -> [(case id, builder returning (model, inputs, fp.score keyword arguments), fp.plan arguments)]
EXAMPLES = {
    "recurrent": [("lstm_classifier", lambda: _rnn("lstm_classifier"), {"macs": 0.3}),
                  ("gru_classifier", lambda: _rnn("gru_classifier"), {"macs": 0.3})],
    # Whole experts save parameters, not per-token MACs (each token still runs top_k experts): planned by alpha.
    "experts": [("moe_classifier-experts", lambda: _moe("experts"), {"alpha": 0.3}),
                ("moe_classifier-hidden", lambda: _moe("hidden"), {"macs": 0.3})],
    "attention_heads": [("nn.TransformerEncoder", _encoder, {"params": 0.4, "allocation": "uniform"}),
                        ("vit_tiny_cifar", _vit, {"macs": 0.3})],
    "hf_attention_heads": [("BertForSequenceClassification", _bert, {"params": 0.4, "allocation": "uniform"}),
                           ("LlamaForSequenceClassification", _llama, {"params": 0.4, "allocation": "uniform"})],
    "conv1d_blocks": [("GPT2ForSequenceClassification", _gpt2, {"macs": 0.3})],
    "stacked_experts": [("MixtralForSequenceClassification", _mixtral, {"params": 0.3})],
    "stacked_expert_units": [("MixtralForSequenceClassification-hidden", _mixtral_hidden, {"macs": 0.3})],
    "fused_gated_mlp": [("Phi3ForSequenceClassification", _phi3, {"macs": 0.3})],
    "levit_heads": [("LevitForImageClassification", _levit, {"params": 0.4, "allocation": "uniform"})],
}
CASES = [(cls.name, case, build, target) for cls in families.registered()
         for case, build, target in EXAMPLES.get(cls.name, [])]


def test_every_registered_family_has_an_example():
    missing = sorted(cls.name for cls in families.registered() if not EXAMPLES.get(cls.name))
    assert not missing, f"registered unit families without an example model in EXAMPLES: {missing}"


def _family_groups(model, x, family, ignore):
    """Names of the groups ``family`` owns (``GroupSpec.family``), found as fp.score finds them."""
    fams = families.build()
    trace = (x[:2],)
    graph = build_graph(model, trace, fams)
    outputs, _ = find_output_layers(model, trace)
    groups = discover_groups(graph, model, fams, ignore=tuple(ignore) + tuple(outputs), example_inputs=trace)
    return [g.name for g in groups if g.family is not None and g.family.name == family]


@pytest.mark.parametrize("family,case,build,target", CASES, ids=[f"{f}-{c}" for f, c, _, _ in CASES])
def test_family_contract(family, case, build, target):
    model, x, score_kwargs = build()
    # Flags worth checking: one frozen parameter, one submodule (a Linear: its mode changes nothing) in train mode.
    next(model.parameters()).requires_grad_(False)
    next(m for m in model.modules() if isinstance(m, nn.Linear)).train()
    owned = _family_groups(model, x, family, score_kwargs.get("ignore", ()))
    assert owned, f"the {family} family found no groups in {case}"
    batches = [(x[i:i + 8], torch.arange(8) % CLASSES) for i in range(0, len(x), 8)]
    before = snapshot(model)

    scores = fp.score(model, batches, projections=8, **score_kwargs)
    assert_unchanged(model, before, "score")
    assert set(owned) <= set(scores.names)
    plan = fp.plan(scores, **target)
    assert any(plan.removed[name] for name in owned), f"the {family} groups of {case} lost no unit"

    example = x[:2]
    pruned, masked = assert_prune_equals_mask(model, plan, example, 1e-5)
    assert fp.count_params(pruned) == plan.predicted["params_after"] < plan.predicted["params_before"]
    assert fp.count_macs(pruned, example) == plan.predicted["macs_after"]
    assert fp.count_macs(model, example) == plan.predicted["macs_before"]
    assert [p.shape for p in masked.parameters()] == [p.shape for p in model.parameters()]
    assert_unchanged(model, before, "prune, mask and count")


@pytest.mark.parametrize("family,case,build,target", CASES, ids=[f"{f}-{c}" for f, c, _, _ in CASES])
def test_family_scores_within_a_memory_budget(family, case, build, target):
    """A budget below the whole store: family sites are cut into slices measured over several passes (or, where
    a unit's map is smaller than its projections, kept unprojected), with the same scores."""
    model, x, score_kwargs = build()
    batches = [(x[i:i + 8], torch.arange(8) % CLASSES) for i in range(0, len(x), 8)]
    free = fp.score(model, batches, projections=8, **score_kwargs)
    budget = free.meta["u_store"]["peak_bytes"]
    try:
        tight = fp.score(model, batches, projections=8, max_memory=budget, **score_kwargs)
    except fp.FairPrunerError as e:  # classes of unequal size need room for their padded layout
        budget = int(str(e).split("works is ")[1].split(" bytes")[0])
        tight = fp.score(model, batches, projections=8, max_memory=budget, **score_kwargs)
    assert tight.meta["u_store"]["passes"] > 1 or tight.meta["u_store"]["unprojected_sites"] > 0
    assert tight.meta["u_store"]["peak_bytes"] <= budget * 3 // 4
    for a, b in zip(free.groups, tight.groups):
        assert torch.equal(a.u, b.u) and torch.equal(a.r, b.r), a.name


HF_CASES = [("llama", _llama), ("gpt2", _gpt2), ("mixtral", _mixtral), ("phi3", _phi3), ("levit", _levit)]


@pytest.mark.parametrize("case,build", HF_CASES, ids=[c for c, _ in HF_CASES])
def test_pruned_hugging_face_model_saves_and_reloads(case, build, tmp_path):
    """fp.save, then fp.load onto a model freshly built from the same config: the same outputs."""
    model, x, score_kwargs = build()
    batches = [(x[i:i + 8], torch.arange(8) % CLASSES) for i in range(0, len(x), 8)]
    plan = fp.plan(fp.score(model, batches, projections=8, **score_kwargs), params=0.3, allocation="uniform")
    pruned = fp.prune(model, plan)
    fp.save(tmp_path / "pruned.pt", pruned, plan)
    fresh, _, _ = build()
    loaded = fp.load(tmp_path / "pruned.pt", fresh).eval()
    with torch.no_grad():
        a, b = pruned(x[:3]).logits, loaded(x[:3]).logits
    assert torch.allclose(a, b, atol=1e-6), case
