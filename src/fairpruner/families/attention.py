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
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member, zero_members_
from .._core.layers import kept, qualname, replace_module, slice_linear_
from .._errors import UnsupportedModelError
from .._measure.counting import attention_macs
from .base import Family, FamilyOptions, MacsTerm, USource, hook_source, register, registered
from .pruned_mha import PrunedMultiheadAttention, mha_head_outputs

__all__ = ["AttentionHeads", "AttentionOptions", "ATTENTION_UNITS", "find_attention", "for_attention_families"]

ATTENTION_UNITS = ("heads", "head_dims")
GQA_UNITS = ("kv_groups", "query_heads")


@dataclass(frozen=True)
class AttentionOptions(FamilyOptions):
    """Options of the attention-head families.

    Attributes:
        units: "heads" (whole heads) or "head_dims" (one dimension of every head at once).
        gqa: under grouped-query attention (Hugging Face decoders), "query_heads" (default: a unit is one
            query head of every key/value group, matched by rank; the key/value heads stay and every group keeps
            as many query heads) or "kv_groups" (a unit is one key/value head with the query heads that read it,
            so the key/value cache shrinks too). Query heads kept more accuracy at the same MACs, one-shot and
            fine-tuned (``benchmarks/gqa.py``); version 2 defaulted to "kv_groups".

    Example:
        >>> fp.score(model, loader, family_options={"hf_attention_heads": AttentionOptions(gqa="kv_groups")})
    """

    version: ClassVar[int] = 3
    units: str = "heads"
    gqa: str = "query_heads"

    def __post_init__(self) -> None:
        if self.units not in ATTENTION_UNITS:
            raise UnsupportedModelError(f"attention={self.units!r} is not one of {ATTENTION_UNITS}.")
        if self.gqa not in GQA_UNITS:
            raise UnsupportedModelError(f"gqa={self.gqa!r} is not one of {GQA_UNITS}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttentionOptions":
        d = dict(d)
        if int(d.get("version", 1)) < 2:  # written before gqa existed: grouped-query attention went by KV groups
            d.setdefault("gqa", "kv_groups")
        return super().from_dict(d)


def for_attention_families(options: AttentionOptions) -> Dict[str, AttentionOptions]:
    """The same options for every registered family that takes :class:`AttentionOptions` (name -> options),
    as ``fp.score(attention=...)`` and the command line's ``--attention``/``--gqa`` set them."""
    return {c.name: options for c in registered() if c.Options is AttentionOptions}


# Children of a timm-style block that may hold parameters: per-head q/k normalisation over head_dim (shared by
# all heads, so whole heads can go, single head dimensions cannot).
_QK_NORMS = ("q_norm", "k_norm")


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
    a = _Attn(name, "fused", heads, head_dim, (qualname(name, "qkv"),), qualname(name, "proj"))
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
            a = _Attn(name, "mha", m.num_heads, m.head_dim, (name,), qualname(name, "out_proj"))
            if not m._qkv_same_embed_dim:
                a.problem = (f"its keys/values have other widths (kdim={m.kdim}, vdim={m.vdim}) than "
                             f"embed_dim={m.embed_dim}")
            elif m.bias_k is not None or m.add_zero_attn:
                a.problem = "it uses add_bias_kv/add_zero_attn"
            found.append(a)
        elif isinstance(m, PrunedMultiheadAttention):
            qkv = tuple(qualname(name, p) for p in ("q_proj", "k_proj", "v_proj"))
            found.append(_Attn(name, "split", m.num_heads, m.head_dim, qkv, qualname(name, "out_proj")))
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


@register
class AttentionHeads(Family):
    """Whole attention heads (or head-balanced head dimensions) of timm-style attention and
    ``nn.MultiheadAttention``."""

    name = "attention_heads"
    Options = AttentionOptions

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def owned(self, model: nn.Module) -> List[str]:
        # Every recognised module, prunable or not: torch-pruning must never cut an attention's inner width
        # (nor, through nn.MultiheadAttention's pruner, its embed_dim).
        return [n for a in find_attention(model) for n in a.modules()]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        mode = self.options.units
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
            groups.append(_HeadGroup(f"{a.name}:{mode}", n, torch.arange(n).view(n, 1), members, family=self,
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
                    emit(_per_unit(mha_head_outputs(mod, bound.arguments), pos))
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
        keep = kept(a.inner, pos[torch.tensor(channels, dtype=torch.long)].flatten())
        if group.mode == "heads":
            kept_heads = [h for h in range(a.heads) if h not in set(channels)]
            heads, head_dim = len(kept_heads), a.head_dim
        else:
            kept_heads, heads, head_dim = list(range(a.heads)), a.heads, a.head_dim - len(channels)
        module = model.get_submodule(a.name)
        if a.kind == "mha":
            new = PrunedMultiheadAttention.from_mha(module, keep, heads, head_dim, kept_heads)
            replace_module(model, a.name, new)
            _no_nested_tensors(model, a.name)
            return
        if a.kind == "fused":
            slice_linear_(model.get_submodule(a.producers[0]), 0, torch.cat([keep, keep + a.inner, keep + 2 * a.inner]))
        else:
            for p in a.producers:
                slice_linear_(model.get_submodule(p), 0, keep)
            module.head_index = tuple(module.head_index[h] for h in kept_heads)
        slice_linear_(model.get_submodule(a.proj), 1, keep)
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
    scale with its units: everything of nn.MultiheadAttention, the attention products of the others."""
    return attention_macs(model, example_inputs, whole=[a.name for a in found if a.kind == "mha"],
                          functional=[a.name for a in found if a.kind != "mha"])
