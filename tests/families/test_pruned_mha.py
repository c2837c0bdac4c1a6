"""Tests for fairpruner.families.pruned_mha: PrunedMultiheadAttention computes what nn.MultiheadAttention does
(batch first or not, masks, attention weights, unbatched) and keeps per-head masks on the kept heads."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fairpruner import PrunedMultiheadAttention

T, DIM, HEADS = 5, 16, 4


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float3d"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_replacement_computes_what_multihead_attention_does(batch_first, masks, need_weights, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first).eval()
    rep = PrunedMultiheadAttention.from_mha(mha, torch.arange(DIM), HEADS, DIM // HEADS, range(HEADS)).eval()
    b, l, s = 2, 3, T
    q, kv = torch.randn(b, l, DIM), torch.randn(b, s, DIM)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kw = {}
    if masks == "bool":
        pad = torch.zeros(b, s, dtype=torch.bool)
        pad[:, -1] = True  # the last position is padding
        kw = {"key_padding_mask": pad, "attn_mask": torch.triu(torch.ones(l, s, dtype=torch.bool), 2)}
    elif masks == "float3d":
        kw = {"attn_mask": torch.randn(b * HEADS, l, s)}
    with torch.no_grad():
        ref = mha(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kw)
        got = rep(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    else:
        assert got[1] is None and ref[1] is None


def test_replacement_unbatched_and_errors():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS).eval()
    rep = PrunedMultiheadAttention.from_mha(mha, torch.arange(DIM), HEADS, DIM // HEADS, range(HEADS)).eval()
    x = torch.randn(T, DIM)
    with torch.no_grad():
        torch.testing.assert_close(rep(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="is_causal"):
        rep(x, x, x, is_causal=True)
    assert rep._qkv_same_embed_dim is False and rep.in_proj_bias is rep.q_proj.bias


def test_pruned_per_head_mask_follows_the_kept_heads():
    """A 3-D attn_mask (one per original head) still applies to the right heads after pruning."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    keep_heads = [0, 2, 3]
    hd = DIM // HEADS
    keep = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep_heads])
    rep = PrunedMultiheadAttention.from_mha(mha, keep, 3, hd, keep_heads).eval()
    masked = copy.deepcopy(mha)
    with torch.no_grad():
        drop = torch.arange(1 * hd, 2 * hd)
        for i in range(3):
            masked.in_proj_weight[i * DIM + drop] = 0
            masked.in_proj_bias[i * DIM + drop] = 0
        masked.out_proj.weight[:, drop] = 0
        x, m = torch.randn(2, T, DIM), torch.randn(2 * HEADS, T, T)
        torch.testing.assert_close(rep(x, x, x, attn_mask=m)[0], masked(x, x, x, attn_mask=m)[0], rtol=1e-5, atol=1e-6)
