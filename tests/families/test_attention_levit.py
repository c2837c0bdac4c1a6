"""Tests for fairpruner.families.attention_levit: LeViT's attention (and its subsampling variant) pruned by whole
heads with their rows of the fused Linear+BatchNorm projections, projection columns and attention-bias rows;
prune == mask, predicted == counted, the module's attributes, repeated scoring with its eval-mode bias cache, and
the caller's model untouched."""
from __future__ import annotations

import pytest
import torch

import fairpruner as fp
from helpers import assert_prune_equals_mask, assert_unchanged, randomize_norms, rel_err, snapshot
from fairpruner.families.attention_levit import levit_attention

transformers = pytest.importorskip("transformers")

CLASSES = 3


def levit(seed=0):
    config = transformers.LevitConfig(image_size=32, num_labels=CLASSES, hidden_sizes=[32, 48, 64],
                                      num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[8, 8, 8])
    torch.manual_seed(seed)
    model = transformers.LevitForImageClassification(config).eval()
    randomize_norms(model, seed)
    with torch.no_grad():
        for _, m in levit_attention(model):
            m.attention_biases.normal_(0, 0.5)
    return model


def loader(n=24):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return [(x[i:i + 8], torch.arange(8) % CLASSES) for i in range(0, n, 8)]


def test_heads_prune_equals_mask_and_attributes():
    model = levit()
    attention = dict(levit_attention(model))
    assert any(hasattr(m, "queries") for m in attention.values())  # the subsampling variant is covered
    snap = snapshot(model)
    scores = fp.score(model, loader(), samples_per_class=4, projections=8)
    assert_unchanged(model, snap, "score")
    again = fp.score(model, loader(), samples_per_class=4, projections=8)  # the bias cache is not in the way
    heads = {g.name: g for g in scores.groups if g.name.endswith(":heads")}
    assert set(heads) == {f"{n}:heads" for n, m in attention.items() if m.num_attention_heads > 1}
    for a, b in zip(scores.groups, again.groups):
        assert torch.equal(a.u, b.u) and torch.equal(a.r, b.r)
    plan = fp.plan(scores, params=0.4, allocation="uniform")
    pruned = fp.prune(model, plan)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert rel_err(pruned(x).logits, model(x).logits) > 1e-4
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    cut = 0
    for name, m in levit_attention(pruned):
        h = m.num_attention_heads
        cut += h < attention[name].attention_biases.shape[0]
        assert m.attention_biases.shape[0] == h and m.out_dim_projection == h * m.attention_ratio * m.key_dim
        assert m.projection.linear.in_features == m.out_dim_projection
    assert cut > 0
    assert_unchanged(model, snap, "prune")


def test_scoring_in_several_passes_leaves_no_bias_cache():
    """Forward-only passes stop at their last site; the caller's module keeps no cached biases from them."""
    model = levit()
    free = fp.score(model, loader(), samples_per_class=4, projections=8)
    tight = fp.score(model, loader(), samples_per_class=4, projections=8,
                     max_memory=free.meta["u_store"]["peak_bytes"] // 12)
    assert tight.meta["u_store"]["passes"] > 1
    for a, b in zip(free.groups, tight.groups):
        assert torch.equal(a.u, b.u) and torch.equal(a.r, b.r), a.name
    assert all(not m.attention_bias_cache for _, m in levit_attention(model))
