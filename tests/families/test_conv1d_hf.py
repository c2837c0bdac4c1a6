"""Tests for fairpruner.families.conv1d_hf: GPT-2 (transformers' transposed-weight Conv1D, packed c_attn) pruned by
heads and MLP units: groups, prune == mask, predicted == counted params/MACs, attributes, generate(), caller
untouched, and the pruned model against an independent oracle (zeroed value columns and MLP units)."""
from __future__ import annotations

import copy

import pytest
import torch

import fairpruner as fp
from helpers import assert_prune_equals_mask, generated_pruned_and_masked, last_token_loss, rel_err

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, LAYERS, VOCAB, SEQ, CLASSES = 64, 4, 2, 100, 12, 3


def gpt2(head="GPT2ForSequenceClassification", impl="eager", seed=0):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                     num_labels=CLASSES, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     use_cache=False, attn_implementation=impl)
    torch.manual_seed(seed)
    model = getattr(transformers, head)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if ".ln_" in name and name.endswith("weight") else
                    torch.randn(p.shape, generator=g) * 0.2)
    return model


def loader(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    y = torch.arange(n) % CLASSES
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def fresh(n=3, seed=7):
    return torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def scored():
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False)
    return model, before, scores


def test_groups_are_heads_and_mlp_units(scored):
    _, _, scores = scored
    names = {g.name: g for g in scores.groups}
    for layer in range(LAYERS):
        assert names[f"transformer.h.{layer}.attn:heads"].n_units == HEADS
        assert names[f"transformer.h.{layer}.mlp:units"].n_units == 4 * HIDDEN
    assert len(names) == 2 * LAYERS  # the hidden size (embeddings, LayerNorms) is kept, and the score head
    assert all(torch.isfinite(g.u).all() and bool((g.r > 0).all()) for g in scores.groups)


@pytest.mark.parametrize("target", [{"alpha": 0.3}, {"macs": 0.4}, {"params": 0.3}])
def test_prune_equals_mask_and_predictions(scored, target):
    model, before, scores = scored
    plan = fp.plan(scores, **target)
    assert any(g["removed_channels"] for g in plan.groups if g["name"].endswith(":heads"))
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert rel_err(pruned(x).logits, model(x).logits) > 1e-3
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    assert fp.count_macs(model, x) == plan.predicted["macs_before"]
    modules = dict(pruned.named_modules())
    for g in plan.groups:
        block = modules[g["name"].rpartition(":")[0]]
        kept = g["units"] - len(g["removed_channels"])
        if g["name"].endswith(":heads"):
            assert (block.num_heads, block.split_size, block.head_dim) == (kept, kept * 16, 16)
            assert block.c_attn.weight.shape == (HIDDEN, 3 * kept * 16) and block.c_attn.nf == 3 * kept * 16
            assert block.c_proj.weight.shape == (kept * 16, HIDDEN) and block.c_proj.nx == kept * 16
        else:
            assert block.c_fc.weight.shape == (HIDDEN, kept) and block.c_proj.weight.shape == (kept, HIDDEN)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pruned_equals_an_independent_oracle(scored):
    """Zeroing a head's value columns (and bias) silences it; zeroing an MLP unit's c_fc column and bias gives
    gelu(0) = 0: the oracle is built without fp.mask."""
    model, _, scores = scored
    plan = fp.plan(scores, macs=0.4)
    oracle = copy.deepcopy(model)
    modules = dict(oracle.named_modules())
    with torch.no_grad():
        for g in plan.groups:
            block = modules[g["name"].rpartition(":")[0]]
            for u in g["removed_channels"]:
                if g["name"].endswith(":heads"):
                    cols = slice(2 * HIDDEN + u * 16, 2 * HIDDEN + (u + 1) * 16)
                    block.c_attn.weight[:, cols] = 0
                    block.c_attn.bias[cols] = 0
                else:
                    block.c_fc.weight[:, u] = 0
                    block.c_fc.bias[u] = 0
    x = fresh(4, seed=3)
    assert rel_err(fp.prune(model, plan)(x).logits, oracle(x).logits) < 1e-5


def test_causal_lm_generates_after_pruning_with_sdpa():
    model = gpt2("GPT2LMHeadModel", impl="sdpa")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES))
    plan = fp.plan(scores, macs=0.4)
    runs = generated_pruned_and_masked(model, plan, fresh(2, seed=5)[:, :5], 6)
    assert runs[0].shape == (2, 11) and torch.equal(runs[0], runs[1])


def test_a_none_between_the_inputs_keeps_its_place_in_the_plan(tmp_path):
    """GPT-2 takes its cache second, so a masked batch is (ids, None, mask): the plan records the None, and prune
    and load rebuild the inputs in that order (the mask used to land in past_key_values)."""
    model = gpt2()
    x = fresh(24, seed=1)
    mask = torch.ones_like(x)
    mask[::3, -4:] = 0
    batches = [((x[i:i + 8], None, mask[i:i + 8]), torch.arange(8) % CLASSES) for i in range(0, 24, 8)]
    plan = fp.plan(fp.score(model, batches, samples_per_class=4, projections=8, progress=False), alpha=0.1)
    assert plan.example_inputs[1] == {"value": None}
    pruned = fp.prune(model, plan)  # traced on inputs rebuilt from the plan
    fp.save(tmp_path / "p.pt", pruned, plan)
    loaded = fp.load(tmp_path / "p.pt", gpt2(seed=1))
    inputs = (x[:4], None, mask[:4])
    torch.testing.assert_close(loaded(*inputs).logits, pruned(*inputs).logits)
    assert_prune_equals_mask(model, plan, inputs, pruned=pruned)
