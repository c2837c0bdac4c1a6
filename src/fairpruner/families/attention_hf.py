"""Hugging Face ``transformers`` models: whole attention heads as a unit family.

Two self-attention layouts are recognised (by their attributes, on classes defined in ``transformers``):

* BERT style (``BertSelfAttention``, RoBERTa, transformers 4's ``ViTSelfAttention``): ``query``/``key``/``value``
  Linear layers, ``num_attention_heads``, ``attention_head_size``, ``all_head_size``; the output projection is
  ``<parent>.output.dense``.
* Llama style (transformers 5's ``ViTAttention``): ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear layers,
  ``num_attention_heads`` (or ``num_heads``) and ``head_dim``.

Grouped-query attention (fewer key/value heads) and other transformers attention modules with a head count
(DistilBERT's ``q_lin``/``out_lin``, T5) are protected: their projections are kept whole, since torch-pruning
alone would cut single head dimensions and break the head reshape. Units are whole heads only
(``attention="head_dims"`` is refused).

A head's members are its ``head_dim`` rows of the query, key and value projections (weights and biases) and
the same columns of the output projection. Removing a head leaves ``head_dim`` and the softmax scale
``head_dim ** -0.5`` unchanged (stored as ``scaling`` by transformers 5, recomputed from
``attention_head_size`` by transformers 4), so the eager and the SDPA paths compute what the masked model does
(a zeroed value row gives the head a zero output, whatever its attention pattern). The surgery writes back the
module's head count and width, and records the removed heads (original numbering) in
``config.pruned_heads`` as transformers 4 did; ``config.num_attention_heads`` keeps describing the unpruned
architecture, which is what :func:`fairpruner.load` rebuilds from. (``save_pretrained``/``from_pretrained``
cannot restore a pruned model: the config has no per-layer feed-forward widths. Use :func:`fairpruner.save`.)

The feed-forward (intermediate) units are ordinary torch-pruning groups (``intermediate.dense`` ->
``output.dense``, ``mlp.fc1`` -> ``mlp.fc2``); the hidden size is coupled to every LayerNorm and stays.
The parameters a ViT's embeddings module uses directly (class token, position table) sit on that residual
stream, which the core accepts for exactly that reason.

This module never imports ``transformers``: it only reads module attributes.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member
from .._core.inputs import first_sample
from .._core.layers import slice_linear_
from .._errors import PlanError, UnsupportedModelError
from .._measure.counting import attention_macs
from .attention import AttentionOptions
from .base import Family, MacsTerm, USource, hook_source, register

__all__ = ["HFAttentionHeads"]

_BERT_STYLE = ("query", "key", "value")
_PROJ_STYLE = ("q_proj", "k_proj", "v_proj")


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


@dataclass
class _Attention:
    """One recognised self-attention module and the names of its projections."""

    name: str       # the attention module (holds the head count)
    qkv: Tuple[str, ...]  # query, key, value projections (empty for an unknown layout)
    out: str        # the output projection, reading the concatenated heads
    heads: int
    head_dim: int
    prunable: bool  # False: grouped-query or unknown attention, owned (kept from torch-pruning), never cut
    protected: Tuple[str, ...] = ()  # Linear layers of an unknown attention layout, kept whole

    @property
    def linears(self) -> Tuple[str, ...]:
        return self.qkv + ((self.out,) if self.out else ()) + self.protected

    @property
    def group_name(self) -> str:
        return f"{self.name}:heads"


def _linear(module: nn.Module, attr: str) -> Optional[nn.Linear]:
    m = getattr(module, attr, None)
    return m if isinstance(m, nn.Linear) else None


def _heads_of(module: nn.Module) -> Optional[int]:
    for attr in ("num_attention_heads", "num_heads", "n_heads"):  # n_heads: DistilBERT, T5
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    return None


def _layout(modules: Dict[str, nn.Module], name: str, m: nn.Module) -> Optional[tuple]:
    """``(query/key/value names, output projection name, head_dim)`` of a known attention layout, else None."""
    if all(_linear(m, a) for a in _BERT_STYLE) and isinstance(getattr(m, "attention_head_size", None), int):
        # The output projection lives in the parent: <parent>.output.dense.
        parent_name, _, child = name.rpartition(".")
        parent = modules.get(parent_name)
        out = getattr(getattr(parent, "output", None), "dense", None)
        if parent_name and getattr(parent, child, None) is m and isinstance(out, nn.Linear):
            return tuple(f"{name}.{a}" for a in _BERT_STYLE), f"{parent_name}.output.dense", m.attention_head_size
    if all(_linear(m, a) for a in _PROJ_STYLE + ("o_proj",)) and isinstance(getattr(m, "head_dim", None), int):
        return tuple(f"{name}.{a}" for a in _PROJ_STYLE), f"{name}.o_proj", m.head_dim
    return None


def find_attention(model: nn.Module) -> List[_Attention]:
    """The Hugging Face self-attention modules of ``model``: those whose heads can be cut, and those whose
    projections must be kept whole (grouped-query attention, layouts this module does not know)."""
    modules = dict(model.named_modules())
    found = []
    for name, m in modules.items():
        heads = _heads_of(m) if _from_transformers(m) else None
        if heads is None:
            continue
        layout = _layout(modules, name, m)
        if layout is None:
            # An unknown layout (DistilBERT's q_lin/out_lin, ALBERT, T5): torch-pruning alone would cut single
            # head dimensions and break the head reshape, so its projections are kept whole.
            linears = tuple(f"{name}.{n}" for n, c in m.named_children() if isinstance(c, nn.Linear))
            if linears:
                found.append(_Attention(name, (), "", heads, 0, False, linears))
            continue
        qkv, out, head_dim = layout
        width = heads * head_dim
        prunable = all(modules[n].out_features == width for n in qkv) and modules[out].in_features == width
        found.append(_Attention(name, qkv, out, heads, head_dim, prunable))
    return found


@register
class HFAttentionHeads(Family):
    """Attention heads of Hugging Face ``transformers`` models (BERT, RoBERTa, ViT, DeiT ...)."""

    name = "hf_attention_heads"
    Options = AttentionOptions

    def __init__(self, options: Optional[AttentionOptions] = None) -> None:
        super().__init__(options)
        self._macs_cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

    def owned(self, model: nn.Module) -> List[str]:
        return [n for a in find_attention(model) for n in a.linears]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        mode = self.options.units
        groups = []
        for a in find_attention(model):
            if a.prunable and mode != "heads":
                raise UnsupportedModelError(
                    f"attention={mode!r}: Hugging Face attention ('{a.name}') is pruned in whole heads only; score "
                    "with attention='heads' (the default).")
            if not a.prunable or a.heads < 2 or any(n in ignore for n in (a.name,) + a.linears):
                continue
            index = torch.arange(a.heads * a.head_dim).view(a.heads, a.head_dim)
            members = [Member(q, "out", index, "weight") for q in a.qkv] + [Member(a.out, "in", index, "weight")]
            groups.append(GroupSpec(a.group_name, a.heads, torch.arange(a.heads).view(-1, 1), members,
                                    family=self))
        return groups

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        # A head's output is what the output projection reads: (B, T, heads * head_dim) -> (B, heads, T * d).
        out = next(m for m in group.members if m.side == "in")
        return [hook_source(group.name, out.module, side="input", index=out.index, channels_last=True)]

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        # The attention products (q k^T and attention x v, or one SDPA call) scale with the number of heads.
        name = group.name[: -len(":heads")]
        macs = self._attention_macs(model, example_inputs).get(name, 0)
        query = next(m.module for m in group.members if m.side == "out")
        return [(float(macs), (query, 0), None)] if macs else []

    def _attention_macs(self, model: nn.Module, example_inputs: tuple) -> Dict[str, int]:
        """Functional MACs counted inside each attention module (as :func:`fairpruner.count_macs` counts them)
        for one sample; one forward pass serves every group."""
        attention = {a.name for a in find_attention(model)}
        x = first_sample(example_inputs)
        key = (tuple((tuple(t.shape), t.dtype) if torch.is_tensor(t) else repr(t) for t in x),
               tuple(int(p.shape[0]) for n, p in model.named_parameters() if n.endswith("weight")))
        cached = self._macs_cache.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        per = attention_macs(model, x, functional=attention)
        self._macs_cache[model] = (key, per)
        return per

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        modules = dict(model.named_modules())
        name = group.name[: -len(":heads")]
        attn = modules[name]
        heads = _heads_of(attn)
        if heads != group.channels:
            raise PlanError(f"'{name}' has {heads} attention heads, the plan expects {group.channels}. Apply a plan "
                            "to an unpruned instance of the architecture it was made for.")
        drop = sorted(set(int(c) for c in channels))
        keep_heads = [h for h in range(heads) if h not in drop]
        index = group.members[0].index
        rows = index[torch.tensor(keep_heads, dtype=torch.long)].flatten()
        for mem in group.members:
            slice_linear_(modules[mem.module], 0 if mem.side == "out" else 1, rows)
        _record_pruned_heads(modules, name, getattr(model, "config", None) or getattr(attn, "config", None),
                             heads, drop)
        # head_dim (and with it the softmax scale) is unchanged; the forward reshapes with -1 heads, but
        # transformers 4 reads the head count and width attributes.
        for attr in ("num_attention_heads", "num_heads"):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, len(keep_heads))
        if isinstance(getattr(attn, "all_head_size", None), int):
            attn.all_head_size = len(keep_heads) * int(index.shape[1])


def _layer_index(name: str) -> Optional[int]:
    """The layer number in a qualified name (``bert.encoder.layer.3.attention.self`` -> 3)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    return int(numbers[-1]) if numbers else None


def _record_pruned_heads(modules: Dict[str, nn.Module], name: str, config: Any, heads: int,
                         removed: List[int]) -> None:
    """Adds the removed heads, in the layer's original numbering, to ``config.pruned_heads`` (transformers 4's
    record, ``{layer: [heads]}``, which its ``from_pretrained`` replays) and to the attention block's own
    ``pruned_heads`` set where it has one (transformers 4's ``prune_heads`` reads it).

    Args:
        modules: the model's modules by name; ``name`` is the attention module's.
        config: the model's configuration (shared by its layers), or None.
        heads: the layer's head count before this cut; ``removed`` is in that (current) numbering.
    """
    layer = _layer_index(name)
    record = dict(getattr(config, "pruned_heads", None) or {}) if config is not None else {}
    before = set(record.get(layer, record.get(str(layer), []))) if layer is not None else set()
    # Current head h is the h-th head not removed before, in the original numbering.
    alive = [h for h in range(heads + len(before)) if h not in before]
    now = sorted(before | {alive[h] for h in removed})
    if config is not None and layer is not None:
        record.pop(str(layer), None)
        record[layer] = now
        config.pruned_heads = record
    parent = modules.get(name.rpartition(".")[0]) if "." in name else None
    for owner in (modules[name], parent):
        if isinstance(getattr(owner, "pruned_heads", None), set):
            owner.pruned_heads = set(now)

