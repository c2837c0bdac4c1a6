"""Attention heads as a unit family: timm-style attention and ``nn.MultiheadAttention``.

Recognised modules:

* timm style (found by duck typing): a fused ``qkv`` Linear (rows: all q, then all k, then all v, head-major),
  an output ``proj`` Linear and an int ``num_heads``; ``head_dim`` follows from the shapes. Its forward must
  reshape with ``num_heads`` and ``head_dim`` (not the embedding width) and, for head-dimension pruning, use
  a ``scale`` fixed at construction. The surgery shrinks both Linears and writes back ``num_heads`` and
  ``head_dim``; ``scale`` is never touched.
* ``nn.MultiheadAttention`` with ``kdim == vdim == embed_dim`` (batch_first or not; alone or inside
  ``nn.TransformerEncoderLayer``/``DecoderLayer``). PyTorch ties its inner width to ``embed_dim``, so a pruned
  one is replaced by :class:`PrunedMultiheadAttention`: same call signature and ``(output, weights)`` return,
  same ``batch_first``, plain Linear layers, the original softmax scale.

Units (``fairpruner.score(..., attention=...)``):

* ``"heads"`` (default): whole heads. A head's members are its q, k and v rows (weights and biases) and the
  same columns of the output projection. Zeroed q/k rows give a uniform attention pattern and a zeroed v
  row a zero output, so the masked model computes what the pruned one does.
* ``"head_dims"``: dimension ``d`` of every head at once (head-balanced, every head keeps the same
  ``head_dim``). The softmax scale stays the original ``head_dim ** -0.5``: zeroing dimension ``d`` of q and k
  removes its term from every dot product, and so does cutting it.

U is observed on the concatenated head outputs, i.e. the output projection's input ``(B, T, heads*head_dim)``,
as ``(B, units, T * k)``. ``nn.MultiheadAttention`` never exposes that tensor, so a hook recomputes it from the
module's inputs. MACs of the attention products (``q k^T`` and ``attn v``) scale with the kept units and are
cost-model terms, so predicted MACs equal :func:`fairpruner.count_macs` of the pruned model.

The residual (embedding) stream -- the width ``qkv`` reads and ``proj`` writes, shared with every LayerNorm,
the class token and the position embedding -- is never pruned; the MLP hidden units (``fc1 -> fc2``,
``linear1 -> linear2``) are ordinary torch-pruning groups.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._counting import _LAYER_MACS, _FunctionalMatmuls, _mha_macs
from ._errors import UnsupportedModelError
from ._family import Family, MacsTerm, USource, family_option, hook_source, register, zero_members_
from ._graph import CONV_TYPES, GroupSpec, Member, preserved_state
from ._scoring import ATTENTION_UNITS
from ._tensors import first_sample

__all__ = ["AttentionHeads", "PrunedMultiheadAttention", "ATTENTION_UNITS", "find_attention"]

# Children of a timm-style block that may hold parameters: per-head q/k normalisation over head_dim (shared by
# all heads, so whole heads can go, single head dimensions cannot).
_QK_NORMS = ("q_norm", "k_norm")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class _Attn:
    """One recognised attention module."""

    name: str
    kind: str                  # "fused" (qkv Linear), "split" (q/k/v Linears), "mha" (nn.MultiheadAttention)
    heads: int
    head_dim: int
    producers: Tuple[str, ...]  # modules holding the q/k/v rows
    proj: str                   # output projection, reading the concatenated heads
    problem: Optional[str] = None       # why its heads cannot be pruned at all
    dims_problem: Optional[str] = None  # why its head dimensions cannot be pruned

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    def modules(self) -> Tuple[str, ...]:
        return (self.name,) + self.producers + (self.proj,)


def _fused(name: str, m: nn.Module) -> Optional[_Attn]:
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
        return None
    inner = proj.in_features
    head_dim = inner // heads if heads > 0 and inner % heads == 0 else 0
    a = _Attn(name, "fused", heads, head_dim, (_join(name, "qkv"),), _join(name, "proj"))
    declared = getattr(m, "head_dim", head_dim)
    if qkv.out_features != 3 * inner:
        a.problem = (f"its qkv layer has {qkv.out_features} outputs, not 3 x the {inner} inputs of proj (separate "
                     "key/value heads, as in grouped-query attention, are not supported)")
    elif head_dim == 0:
        a.problem = f"proj's {inner} inputs do not split into num_heads={heads} equal heads"
    elif isinstance(declared, int) and declared != head_dim:
        a.problem = f"head_dim={declared} disagrees with proj's {inner} inputs over {heads} heads"
    elif list(m.parameters(recurse=False)):
        a.problem = ("it holds parameters of its own (e.g. a relative position bias per head), which the head "
                     "surgery cannot follow")
    else:
        extra = [c for c, sub in m.named_children() if c not in ("qkv", "proj") and list(sub.parameters())]
        if [c for c in extra if c not in _QK_NORMS]:
            a.problem = f"its child layers {extra} hold parameters on the head outputs"
        elif extra:
            a.dims_problem = f"its {extra} normalise over head_dim"
        elif not isinstance(getattr(m, "scale", None), float):
            a.dims_problem = ("it has no float `scale` attribute fixed at construction, so its softmax scale would "
                              "follow the pruned head_dim")
    return a


def find_attention(model: nn.Module) -> List[_Attn]:
    """The attention modules of ``model`` this family recognises (prunable or not)."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            a = _Attn(name, "mha", m.num_heads, m.head_dim, (name,), _join(name, "out_proj"))
            if not m._qkv_same_embed_dim:
                a.problem = (f"its keys/values have other widths (kdim={m.kdim}, vdim={m.vdim}) than "
                             f"embed_dim={m.embed_dim}")
            elif m.bias_k is not None or m.add_zero_attn:
                a.problem = "it uses add_bias_kv/add_zero_attn"
            found.append(a)
        elif isinstance(m, PrunedMultiheadAttention):
            found.append(_Attn(name, "split", m.num_heads, m.head_dim,
                               tuple(_join(name, p) for p in ("q_proj", "k_proj", "v_proj")), _join(name, "out_proj")))
        elif not type(m).__module__.startswith("transformers."):  # those belong to the Hugging Face family
            a = _fused(name, m)
            if a is not None:
                found.append(a)
    return found


@dataclass
class _HeadGroup(GroupSpec):
    """A family group with what surgery and costing need to know about its module."""

    attn: Optional[_Attn] = None
    mode: str = "heads"
    positions: Optional[torch.Tensor] = None  # (channels, k): positions in the inner width of each channel
    macs: int = 0                              # MACs of one sample that scale with the kept units


class AttentionHeads(Family):
    """Whole attention heads (or head-balanced head dimensions) of timm-style attention and
    ``nn.MultiheadAttention``."""

    name = "attention_heads"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def owned(self, model: nn.Module) -> List[str]:
        # Every recognised module, prunable or not: torch-pruning must never cut an attention's inner width
        # (nor, through nn.MultiheadAttention's pruner, its embed_dim).
        return [n for a in find_attention(model) for n in a.modules()]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        mode = family_option("attention", "heads")
        if mode not in ATTENTION_UNITS:
            raise UnsupportedModelError(f"attention={mode!r} is not one of {ATTENTION_UNITS}.")
        found = [a for a in find_attention(model) if not any(n in ignore for n in a.modules())]
        for a in found:
            problem = a.problem or (a.dims_problem if mode == "head_dims" else None)
            if problem:
                raise UnsupportedModelError(
                    f"Attention '{a.name}' ({a.kind}) cannot be pruned: {problem}. Add '{a.name}' to `ignore=` to "
                    "leave it unpruned" + (", or score with attention='heads'." if not a.problem else "."))
        found = [a for a in found if (a.heads if mode == "heads" else a.head_dim) >= 2]
        if not found:
            return []
        macs = _attention_macs(model, example_inputs, found)
        groups = []
        for a in found:
            layout = torch.arange(a.inner).view(a.heads, a.head_dim)
            pos = layout if mode == "heads" else layout.t().contiguous()
            rows = torch.cat([pos, pos + a.inner, pos + 2 * a.inner], 1)
            if a.kind == "fused":
                members = [Member(a.producers[0], "out", rows, "weight")]
            elif a.kind == "split":
                members = [Member(p, "out", pos, "weight") for p in a.producers]
            else:
                mha = model.get_submodule(a.name)
                params = tuple((n, 0) for n in ("in_proj_weight", "in_proj_bias") if getattr(mha, n) is not None)
                members = [Member(a.name, "out", rows, "weight", params=params)]
            members.append(Member(a.proj, "in", pos, "weight"))
            n = pos.shape[0]
            groups.append(_HeadGroup(f"{a.name}:{mode}", n, torch.arange(n).view(n, 1), members, family=self.name,
                                     attn=a, mode=mode, positions=pos, macs=macs.get(a.name, 0)))
        return groups

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        a, pos = group.attn, group.positions
        if a.kind != "mha":
            return [hook_source(group.name, a.proj, side="input", index=pos, channels_last=True)]

        def attach(modules: Dict[str, nn.Module], emit) -> List[Any]:
            mha = modules[a.name]
            sig = inspect.signature(mha.forward)

            def hook(mod, args, kwargs, out):
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                with torch.no_grad():
                    emit(_per_unit(_mha_head_outputs(mod, bound.arguments), pos))
            return [mha.register_forward_hook(hook, with_kwargs=True)]
        return [USource(group.name, attach)]

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        a = group.attn
        if not group.macs:
            return []
        if a.kind == "mha":  # every MAC of nn.MultiheadAttention (projections too) runs outside Linear modules
            key = (a.name, "in_proj_weight", 0)
        else:  # the attention products; the projections are Linear layers, costed by the model
            key = (a.producers[0], 0)
        return [(float(group.macs), key, None)]

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        a, pos = group.attn, group.positions
        drop = set(pos[torch.tensor(channels, dtype=torch.long)].flatten().tolist())
        keep = torch.tensor([i for i in range(a.inner) if i not in drop], dtype=torch.long)
        if group.mode == "heads":
            kept_heads = [h for h in range(a.heads) if h not in set(channels)]
            heads, head_dim = len(kept_heads), a.head_dim
        else:
            kept_heads, heads, head_dim = list(range(a.heads)), a.heads, a.head_dim - len(channels)
        module = model.get_submodule(a.name)
        if a.kind == "mha":
            new = PrunedMultiheadAttention.from_mha(module, keep, heads, head_dim, kept_heads)
            _replace(model, a.name, new)
            _no_nested_tensors(model, a.name)
            return
        if a.kind == "fused":
            _select_(model.get_submodule(a.producers[0]), 0, torch.cat([keep, keep + a.inner, keep + 2 * a.inner]))
        else:
            for p in a.producers:
                _select_(model.get_submodule(p), 0, keep)
            module.head_index = tuple(module.head_index[h] for h in kept_heads)
        _select_(model.get_submodule(a.proj), 1, keep)
        module.num_heads = heads
        if hasattr(module, "head_dim"):
            module.head_dim = head_dim

    def mask_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        zero_members_(model, group, channels)
        if group.attn.kind == "mha":
            _no_nested_tensors(model, group.attn.name)  # as in the pruned model (see _no_nested_tensors)


def _per_unit(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, T, inner) head outputs -> (B, units, T * k), with ``pos`` (units, k) the positions of each unit."""
    x = x.movedim(-1, 1).index_select(1, pos.flatten().to(x.device)).unflatten(1, tuple(pos.shape))
    return x.movedim(2, -1).flatten(2)


def _select_(linear: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    """Keeps rows (dim 0, with the bias) or columns (dim 1) ``keep`` of a Linear layer."""
    with torch.no_grad():
        w = linear.weight
        idx = keep.to(w.device)
        linear.weight = nn.Parameter(w.index_select(dim, idx).clone(), requires_grad=w.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, idx).clone(),
                                       requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = int(keep.numel())
    else:
        linear.in_features = int(keep.numel())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _no_nested_tensors(model: nn.Module, name: str) -> None:
    """Switches off the nested-tensor path of every nn.TransformerEncoder holding ``name``.

    That path feeds nested tensors to the layers' attention and reads nn.MultiheadAttention's fused weights.
    Without it, padded positions get ordinary values rather than zeros (what the encoder computes in
    training mode anyway); the mask applies the same switch so that pruned and masked models agree.
    """
    for enc_name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and (not enc_name or name.startswith(enc_name + ".")):
            m.use_nested_tensor = False


def _attention_macs(model: nn.Module, example_inputs: tuple, found: List[_Attn]) -> Dict[str, int]:
    """MACs of one sample that :func:`fairpruner.count_macs` attributes to each attention module and that
    scale with its units: everything of nn.MultiheadAttention (counted whole by a layer hook), the matrix
    products outside Linear layers (the attention products) of the others."""
    counter = _FunctionalMatmuls()
    out: Dict[str, int] = {}
    start: Dict[str, int] = {}
    hooks = []
    modules = dict(model.named_modules())

    def enter(mod, inp):
        counter.depth += 1

    def leave(mod, inp, res):
        counter.depth -= 1

    try:
        # The counting regime of fairpruner.count_macs: products inside Conv/Linear (and MHA/RNN) layers are
        # theirs, not functional.
        for m in modules.values():
            if isinstance(m, CONV_TYPES + (nn.Linear,) + tuple(_LAYER_MACS)):
                hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        for a in found:
            m = modules[a.name]
            if a.kind == "mha":
                hooks.append(m.register_forward_hook(
                    lambda mod, args, kwargs, res, n=a.name: out.__setitem__(n, out.get(n, 0) + _mha_macs(mod, args, kwargs)),
                    with_kwargs=True))
            else:
                hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=a.name: start.__setitem__(n, counter.macs)))
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, res, n=a.name: out.__setitem__(n, out.get(n, 0) + counter.macs - start[n])))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # Fused inference paths would hand nested tensors to the hooks; the count is the dense one anyway.
        torch.backends.mha.set_fastpath_enabled(False)
        with preserved_state(model), torch.no_grad(), counter:
            model(*first_sample(example_inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
    return out


# ------------------------------------------------------------------ the replacement for nn.MultiheadAttention

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


def _mha_head_outputs(mha: nn.MultiheadAttention, args: Dict[str, Any]) -> torch.Tensor:
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


register(AttentionHeads())
