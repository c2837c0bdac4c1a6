"""Tests for the zoo's mixture-of-experts block and classifier."""

from __future__ import annotations

import pytest
import torch

from fairpruner import zoo
from fairpruner.zoo import MoE


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_moe_block_equals_dense_top_k_mixture():
    block = MoE(dim=8, hidden=12, num_experts=5, top_k=2).eval()
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        tokens = x.reshape(-1, 8)
        top, chosen = block.router(tokens).topk(2, -1)
        gates = top.softmax(-1)
        dense = torch.stack([e(tokens) for e in block.experts], 1)  # (N, E, D)
        want = (dense.gather(1, chosen.unsqueeze(-1).expand(-1, -1, 8)) * gates.unsqueeze(-1)).sum(1)
        torch.testing.assert_close(block(x), want.view(3, 7, 8), rtol=1e-5, atol=1e-6)
    assert block.num_experts == len(block.experts) == block.router.out_features == 5 and block.top_k == 2


def test_each_expert_runs_once_on_its_tokens_in_token_order():
    block = MoE(dim=8, hidden=12, num_experts=4, top_k=2).eval()
    x = torch.randn(2, 6, 8)
    rows = {}
    for e, expert in enumerate(block.experts):
        expert.register_forward_pre_hook(lambda m, i, e=e: rows.setdefault(e, []).append(i[0]))
    with torch.no_grad():
        block(x)
        chosen = block.router(x.reshape(-1, 8)).topk(2, -1).indices
    assert all(len(v) == 1 for v in rows.values()) and len(rows) == 4
    for e, (got,) in rows.items():
        torch.testing.assert_close(got, x.reshape(-1, 8)[(chosen == e).any(-1)])
    assert sum(v[0].shape[0] for v in rows.values()) == 12 * 2  # every token goes to exactly top_k experts


def test_top_k_must_fit_the_experts():
    with pytest.raises(ValueError, match="top_k"):
        MoE(dim=4, hidden=4, num_experts=2, top_k=3)


def test_classifier_takes_tokens_and_flat_features():
    model = zoo.create("moe_classifier", num_classes=3).eval()
    assert zoo.input_shape("moe_classifier") == (8, 16)
    with torch.no_grad():
        assert model(zoo.example_input("moe_classifier", 4)).shape == (4, 3)
        assert model(torch.randn(4, 16)).shape == (4, 3)
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(blocks) == 2 and all(b.router.bias is None for b in blocks)
    deep = zoo.moe_classifier(depth=1, num_experts=6, top_k=1, router_bias=True)
    (block,) = [m for m in deep.modules() if isinstance(m, MoE)]
    assert (block.num_experts, block.top_k, block.router.bias is not None) == (6, 1, True)
