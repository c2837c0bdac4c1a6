"""Vision transformers (timm-style ViT/DeiT) and a small ConvNeXt, in plain torch.

The attention block follows timm's layout: one fused ``qkv`` Linear, ``num_heads``/``head_dim``/``scale``
attributes and an output ``proj`` Linear. Its forward reads ``num_heads`` and ``head_dim`` (never the
embedding width) and passes the fixed ``scale`` to ``scaled_dot_product_attention``, so a pruned block
(fewer heads, or a smaller head dimension) computes exactly what the unpruned block does with the removed
units zeroed.

The class token, the position embedding and ConvNeXt's layer-scale ``gamma`` are plain parameters on the
residual (embedding) stream, as in timm; that stream is never pruned.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Attention",
    "Mlp",
    "Block",
    "VisionTransformer",
    "LayerNorm2d",
    "ConvNeXtBlock",
    "ConvNeXt",
    "deit_tiny",
    "vit_tiny_cifar",
    "convnext_atto",
]


def _init_transformer(model: nn.Module) -> None:
    """timm's ViT init: truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (timm layout).

    Args:
        dim: Width of the token embeddings.
        num_heads: Number of attention heads.
        qkv_bias: Give the q/k/v projection a bias.
        head_dim: Width of one head; defaults to ``dim // num_heads``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, head_dim: Optional[int] = None) -> None:
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim=")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        # Fixed at construction: a block whose head dimension is pruned keeps the original softmax scale.
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    """Linear-GELU-Linear feed-forward block.

    Args:
        dim: Input and output width.
        hidden: Hidden width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        qkv_bias: Give the q/k/v projection a bias.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token: patch-embedding convolution, learned position embedding, pre-norm blocks,
    final LayerNorm and a linear head on the class token.

    Args:
        img_size: Side of the square input image.
        patch_size: Side of a square patch.
        in_chans: Input channels.
        num_classes: Number of output logits.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        qkv_bias: Give the q/k/v projections a bias.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        _init_transformer(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def deit_tiny(num_classes: int = 1000, img_size: int = 224) -> VisionTransformer:
    """DeiT-Tiny (Touvron et al., 2021): patch 16, width 192, 12 blocks of 3 heads, MLP ratio 4 (5.7M
    parameters at 1000 classes).

    Args:
        num_classes: Number of output logits.
        img_size: Side of the square input image (a multiple of 16).
    """
    return VisionTransformer(img_size=img_size, patch_size=16, num_classes=num_classes, embed_dim=192, depth=12,
                             num_heads=3, mlp_ratio=4.0)


def vit_tiny_cifar(num_classes: int = 10) -> VisionTransformer:
    """A small ViT for 32x32 images: patch 4 (64 patches and a class token), width 96, 6 blocks of 3 heads,
    MLP ratio 4 (0.67M parameters).

    Args:
        num_classes: Number of output logits.
    """
    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=96, depth=6,
                             num_heads=3, mlp_ratio=4.0)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 convolution, channels-last LayerNorm, Linear(C, 4C)-GELU-Linear(4C, C),
    layer scale ``gamma``, residual addition.

    Args:
        dim: Channels.
        mlp_ratio: Hidden width of the inverted MLP relative to ``dim``.
        layer_scale_init: Initial value of ``gamma`` (timm: 1e-6).
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))  # NHWC
        y = self.mlp(y) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt (Liu et al., 2022) with a patchify stem, stride-2 downsampling between stages, global average
    pooling, a LayerNorm and a linear head.

    Args:
        dims: Channels of each stage.
        depths: Blocks of each stage.
        num_classes: Number of output logits.
        in_chans: Input channels.
        stem_stride: Patch size of the stem (4 on ImageNet; 2 suits 32x32 images).
        layer_scale_init: Initial layer-scale value of every block.
    """

    def __init__(self, dims: Sequence[int] = (40, 80, 160, 320), depths: Sequence[int] = (2, 2, 6, 2),
                 num_classes: int = 10, in_chans: int = 3, stem_stride: int = 4,
                 layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims {tuple(dims)} and depths {tuple(depths)} must be non-empty and of equal length")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride),
                                  LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers = [] if i == 0 else [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            layers += [ConvNeXtBlock(dim, layer_scale_init=layer_scale_init) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        _init_transformer(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


def convnext_atto(num_classes: int = 10, img_size: int = 32) -> ConvNeXt:
    """ConvNeXt-Atto's shape (stages of 40/80/160/320 channels, depths 2/2/6/2; 3.4M parameters), with a
    stride-2 stem for 32x32 images (stride 4 from 64 pixels up).

    Args:
        num_classes: Number of output logits.
        img_size: Side of the input image; picks the stem stride.
    """
    return ConvNeXt(num_classes=num_classes, stem_stride=2 if img_size < 64 else 4)

