"""Tests for the zoo's vision transformers and ConvNeXt: shapes, sizes, the attention block's conventions, and
one FAIR-Pruner round on the registered sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fairpruner as fp
from fairpruner import zoo
from fairpruner.zoo._transformer import Attention, ConvNeXtBlock
from helpers import tiny_loader


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_registered_with_input_shapes():
    assert {"deit_tiny", "vit_tiny_cifar", "convnext_atto"} <= set(zoo.list_models())
    assert zoo.input_shape("deit_tiny") == (3, 224, 224)
    assert zoo.input_shape("vit_tiny_cifar") == zoo.input_shape("convnext_atto") == (3, 32, 32)


@pytest.mark.parametrize("factory,params", [
    (lambda: zoo.deit_tiny(), 5_717_416),  # timm's deit_tiny_patch16_224
    (lambda: zoo.vit_tiny_cifar(), 683_242),
    (lambda: zoo.convnext_atto(), 3_376_290),
])
def test_parameter_counts(factory, params):
    assert fp.count_params(factory()) == params


def test_deit_tiny_shape():
    model = zoo.deit_tiny(num_classes=7, img_size=32)  # the same blocks on 4 patches
    assert len(model.blocks) == 12 and model.pos_embed.shape == (1, 5, 192) and model.cls_token.shape == (1, 1, 192)
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features) == (3, 64, 576)
    assert model.blocks[0].mlp.fc1.out_features == 768
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert zoo.create("deit_tiny").head.out_features == 10 and zoo.deit_tiny().head.out_features == 1000


def test_attention_is_scaled_dot_product_attention_with_its_fixed_scale():
    attn = Attention(12, num_heads=3).eval()
    x = torch.randn(2, 5, 12)
    qkv = attn.qkv(x).view(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    ref = ((q @ k.transpose(-2, -1)) * 4 ** -0.5).softmax(-1) @ v
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(2, 5, 12)))
        # The scale is an attribute read at call time, not recomputed from head_dim.
        attn.scale = 0.1
        assert not torch.allclose(attn(x), attn.proj(ref.transpose(1, 2).reshape(2, 5, 12)))


def test_convnext_block_layout():
    block = ConvNeXtBlock(8, layer_scale_init=0.5)
    assert block.conv_dw.groups == 8 and block.conv_dw.kernel_size == (7, 7)
    assert block.mlp.fc1.out_features == 32 and block.gamma.shape == (8,)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = block(x)
        block.gamma.zero_()
        torch.testing.assert_close(block(x), x)  # residual: a zero layer scale leaves the input
    assert y.shape == x.shape
    model = zoo.convnext_atto(num_classes=5, img_size=64)
    assert model.stem[0].stride == (4, 4) and zoo.convnext_atto().stem[0].stride == (2, 2)
    assert [len(s) for s in model.stages] == [2, 4, 8, 4]  # downsampling (LayerNorm, conv) + blocks


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="multiple"):
        zoo.VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="equal length"):
        zoo.ConvNeXt(dims=(8, 16), depths=(1,))


@pytest.mark.parametrize("name", ["vit_tiny_cifar", "convnext_atto"])
def test_one_pruning_round(name):
    """Heads and MLP hidden units go, the residual stream stays, and the cost model is exact."""
    model = zoo.create(name).eval()
    scores = fp.score(model, tiny_loader((3, 32, 32), per=3), projections=4)
    kinds = {n.rpartition(":")[2] if ":" in n else n.rpartition(".")[2] for n in scores.names}
    assert kinds == ({"heads", "fc1"} if name.startswith("vit") else {"fc1"})
    plan = fp.plan(scores, macs=0.2)
    pruned = fp.prune(model, plan)
    x = zoo.example_input(name, 1)
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"] <= 0.805 * fp.count_macs(model, x)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    widths = {n: m.normalized_shape for n, m in pruned.named_modules() if isinstance(m, nn.LayerNorm)}
    assert widths == {n: m.normalized_shape for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
