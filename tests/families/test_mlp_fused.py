"""Tests for fairpruner.families.mlp_fused: Phi-3's fused gate/up projection pruned by hidden units (rows j and I + j
of gate_up_proj, column j of down_proj); prune == mask, predicted == counted, generate(), and an independent oracle.
(Its fused-qkv attention is tested with the other decoders, in test_decoders_hf.)"""
from __future__ import annotations

import copy

import pytest
import torch

import fairpruner as fp
from helpers import assert_prune_equals_mask, generated_pruned_and_masked, last_token_loss, rel_err

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS, VOCAB, SEQ, CLASSES = 32, 48, 2, 100, 10, 3


def phi3(head="ForSequenceClassification", seed=0):
    config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                     num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=32, num_labels=CLASSES, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, use_cache=False)
    torch.manual_seed(seed)
    model = getattr(transformers, "Phi3" + head)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if norm else torch.randn(p.shape, generator=g) * 0.2)
    return model


def loader(n=24):
    x = torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return [(x[i:i + 8], torch.arange(8) % CLASSES) for i in range(0, n, 8)]


def fresh(n=3, seed=7):
    return torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def test_units_prune_equals_mask_and_an_oracle():
    model = phi3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The attention is ignored: the oracle below knows the MLP's units only.
    attention = [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False, ignore=attention)
    assert sorted(g.name for g in scores.groups) == [f"model.layers.{i}.mlp:units" for i in range(LAYERS)]
    assert all(g.n_units == INTER for g in scores.groups)
    plan = fp.plan(scores, macs=0.3)
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    # Oracle without fp.mask: a unit whose up row is zero contributes act(gate) * 0 = 0.
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for g in plan.groups:
            mlp = oracle.get_submodule(g["name"][:-len(":units")])
            for j in g["removed_channels"]:
                mlp.gate_up_proj.weight[INTER + j] = 0
    assert rel_err(pruned(x).logits, oracle(x).logits) < 1e-5
    for g in plan.groups:
        mlp = pruned.get_submodule(g["name"][:-len(":units")])
        kept = INTER - len(g["removed_channels"])
        assert mlp.gate_up_proj.out_features == 2 * kept and mlp.down_proj.in_features == kept
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pruned_phi3_generates_what_the_masked_one_does():
    model = phi3("ForCausalLM")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES))
    plan = fp.plan(scores, macs=0.3)
    runs = generated_pruned_and_masked(model, plan, fresh(2, seed=3)[:, :4], 5)
    assert torch.equal(runs[0], runs[1])
