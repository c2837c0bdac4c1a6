"""``PrunedMultiheadAttention``: what a pruned ``nn.MultiheadAttention`` becomes.

PyTorch ties ``nn.MultiheadAttention``'s inner width to ``embed_dim``, so a module with fewer (or narrower)
heads needs its own class: plain q/k/v/out Linear layers, the original softmax scale, the same call signature
and return value. :func:`mha_head_outputs` recomputes an unpruned module's per-head outputs for the U-Score.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedMultiheadAttention", "mha_head_outputs"]


def _merged_mask(key_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor], b: int, l: int,
                 s: int, head_index: Sequence[int], source_heads: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """nn.MultiheadAttention's masks as one additive float mask broadcasting to (B, heads, L, S).

    A 3-D ``attn_mask`` holds one mask per original head (``B * source_heads`` of them); the kept heads' are taken.
    """
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype)
    am = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                           target_type=dtype, check_other=False)
    mask = None
    if am is not None:
        if am.dim() == 3:
            if am.shape != (b * source_heads, l, s):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(am.shape)}, but should be "
                                   f"{(b * source_heads, l, s)}.")
            am = am.view(b, source_heads, l, s)
            if list(head_index) != list(range(source_heads)):
                am = am[:, list(head_index)]
        mask = am
    if kpm is not None:
        kpm = kpm.view(b, 1, 1, s)
        mask = kpm if mask is None else mask + kpm
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int, scale: float,
            mask: Optional[torch.Tensor], dropout_p: float, need_weights: bool,
            average: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention of batch-first projections ``(B, L|S, heads*head_dim)``; returns the
    concatenated head outputs ``(B, L, heads*head_dim)`` and, if asked, the attention weights."""
    b, l, s = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(b, l, heads, head_dim).transpose(1, 2)
    k = k.view(b, s, heads, head_dim).transpose(1, 2)
    v = v.view(b, s, heads, head_dim).transpose(1, 2)
    if need_weights:
        attn = torch.matmul(q * scale, k.transpose(-2, -1))
        if mask is not None:
            attn = attn + mask
        attn = attn.softmax(-1)
        if dropout_p > 0:
            attn = F.dropout(attn, p=dropout_p)
        out, weights = torch.matmul(attn, v), (attn.mean(1) if average else attn)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        weights = None
    return out.transpose(1, 2).reshape(b, l, heads * head_dim), weights


def _batch_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 batch_first: bool) -> tuple:
    """Inputs as (B, L|S, E) tensors (unbatched ones get a batch of one); True if they were batched."""
    if query.dim() == 2:
        kpm = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), kpm, False
    if not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    return query, key, value, key_padding_mask, True


def mha_head_outputs(mha: nn.MultiheadAttention, args: Dict[str, Any]) -> torch.Tensor:
    """The concatenated head outputs ``(B, L, embed_dim)`` an nn.MultiheadAttention computes before its output
    projection, recomputed from the call's arguments (in eval mode: no dropout)."""
    q, k, v, kpm, _ = _batch_first(args["query"], args["key"], args["value"], args.get("key_padding_mask"),
                                   mha.batch_first)
    w, b, e = mha.in_proj_weight, mha.in_proj_bias, mha.embed_dim
    bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
    q, k, v = F.linear(q, w[:e], bq), F.linear(k, w[e:2 * e], bk), F.linear(v, w[2 * e:], bv)
    mask = _merged_mask(kpm, args.get("attn_mask"), q.shape[0], q.shape[1], k.shape[1], range(mha.num_heads),
                        mha.num_heads, q.dtype)
    return _attend(q, k, v, mha.num_heads, mha.head_dim, mha.head_dim ** -0.5, mask, 0.0, False, True)[0]


class PrunedMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` with fewer heads or smaller heads than its embedding width implies.

    It takes ``nn.MultiheadAttention``'s arguments (``query, key, value, key_padding_mask, need_weights,
    attn_mask, average_attn_weights, is_causal``), honours ``batch_first`` and unbatched inputs, and returns
    ``(output, weights or None)``; the weights average over the kept heads. ``scale`` is the unpruned module's
    ``head_dim ** -0.5``. ``head_index`` lists the original heads kept, so that a per-head 3-D ``attn_mask``
    made for the unpruned module still applies.

    Args:
        embed_dim: Width of the inputs and the output.
        num_heads: Heads kept.
        head_dim: Width of one head.
        bias: Biases of the q/k/v projections.
        out_bias: Bias of the output projection.
        batch_first: Inputs are (batch, sequence, features).
        dropout: Dropout on the attention weights in training mode.
        scale: Softmax scale; defaults to ``head_dim ** -0.5``.
        head_index: The original heads kept; defaults to all.
        source_heads: Heads of the unpruned module; defaults to ``num_heads``.
    """

    # TransformerEncoderLayer and TransformerEncoder take their fused fast path only when this is True (their
    # kernels assume embed_dim == num_heads * head_dim); False sends them down the ordinary path.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, out_bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, scale: Optional[float] = None,
                 head_index: Optional[Sequence[int]] = None, source_heads: Optional[int] = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.scale = float(head_dim ** -0.5 if scale is None else scale)
        self.head_index = tuple(range(num_heads)) if head_index is None else tuple(int(h) for h in head_index)
        self.source_heads = num_heads if source_heads is None else source_heads
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias)

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        """The query bias (TransformerEncoderLayer's fast-path check reads this attribute)."""
        return self.q_proj.bias

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, keep: torch.Tensor, num_heads: int, head_dim: int,
                 head_index: Sequence[int]) -> "PrunedMultiheadAttention":
        """The pruned version of ``mha`` keeping inner positions ``keep`` (head-major order)."""
        e = mha.embed_dim
        w, b = mha.in_proj_weight, mha.in_proj_bias
        new = cls(e, num_heads, head_dim, bias=b is not None, out_bias=mha.out_proj.bias is not None,
                  batch_first=mha.batch_first, dropout=mha.dropout, scale=mha.head_dim ** -0.5,
                  head_index=head_index, source_heads=mha.num_heads).to(device=w.device, dtype=w.dtype)
        idx = keep.to(w.device)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(w[i * e:(i + 1) * e].index_select(0, idx))
                if b is not None:
                    proj.bias.copy_(b[i * e:(i + 1) * e].index_select(0, idx))
            new.out_proj.weight.copy_(mha.out_proj.weight.index_select(1, idx))
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        for p in new.parameters():
            p.requires_grad_(w.requires_grad)
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if is_causal and attn_mask is None:
            # nn.MultiheadAttention's rule: is_causal is only a hint about the attn_mask given.
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        q, k, v, kpm, batched = _batch_first(query, key, value, key_padding_mask, self.batch_first)
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        mask = _merged_mask(kpm, attn_mask, q.shape[0], q.shape[1], k.shape[1], self.head_index,
                            self.source_heads, q.dtype)
        out, weights = _attend(q, k, v, self.num_heads, self.head_dim, self.scale, mask,
                               self.dropout if self.training else 0.0, need_weights, average_attn_weights)
        out = self.out_proj(out)
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, batch_first={self.batch_first}")
