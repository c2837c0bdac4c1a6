"""Hugging Face ``transformers`` models: whole attention heads as a unit family.

Two self-attention layouts are recognised (by their attributes, on classes defined in ``transformers``):

* BERT style (``BertSelfAttention``, RoBERTa, transformers 4's ``ViTSelfAttention``): ``query``/``key``/``value``
  Linear layers, ``num_attention_heads``, ``attention_head_size``, ``all_head_size``; the output projection is
  ``<parent>.output.dense``.
* Llama style (Llama, Qwen2, Mistral, transformers 5's ``ViTAttention``): ``q_proj``/``k_proj``/``v_proj``/
  ``o_proj`` Linear layers and ``head_dim``; the head count is ``num_attention_heads`` (or ``num_heads``) where
  the module keeps one, else the query width over ``head_dim`` (decoders reshape with -1 heads).
* Fused (Phi-3): one ``qkv_proj`` whose rows are every query head, then every key head, then every value head,
  ``o_proj``, ``head_dim`` and ``num_key_value_heads``. Its forward reads the query width from
  ``config.num_attention_heads``, and the config is shared by every layer: a pruned layer gets its own shallow
  copy of the config with its head counts (``model.config`` keeps describing the unpruned architecture).

Under grouped-query attention (``heads / kv_heads`` query heads read each key/value head) the default unit is
one query head of every key/value group (``AttentionOptions(gqa="query_heads")``): the key/value heads stay and
every group loses the same number of query heads, matched by rank after scoring (unit k is the k-th lowest-U
query head of each group, :meth:`HFAttentionHeads.units_from_scores`); ``num_key_value_groups`` and the head
counts are written back. On a trained Llama classifier this kept 1.6 pt more accuracy one-shot and 0.4 pt more
fine-tuned than key/value groups at the same MACs (validation, mean over 5-20 % MACs, ``benchmarks/gqa.py``), and
the units are finer (a model with one key/value head can still lose query heads). With ``gqa="kv_groups"`` the
unit is one key/value head with the query heads that read them (consecutive, as ``repeat_kv`` expands them): its
``head_dim`` rows of ``k_proj`` and ``v_proj``, its query heads' rows of ``q_proj`` (of a fused projection: those
three sets of rows, kept in their order) and the same columns of ``o_proj``; ``num_key_value_groups`` and the
rotary embedding (which acts within a head) stay unchanged, and the key/value cache shrinks with the heads: the
choice where decoding is bound by the cache's memory. Without grouped-query attention a unit is one head. In
both cases the module runs as before, ``generate()`` and its key/value cache included.

Other transformers attention modules with a head count or a ``head_dim`` (DistilBERT's ``q_lin``/``out_lin``,
T5) are protected: their projections are kept whole, since torch-pruning alone would cut single head dimensions
and break the head reshape. Units are whole heads, query heads or key/value groups only (``attention="head_dims"``
is refused).

A per-head relative position bias table (Swin's ``relative_position_bias_table``, ``(positions, heads)``, on
the attention or its ``relative_position_bias`` child, read with a -1 head dimension) loses the columns of the
removed heads.

Removing a unit leaves ``head_dim`` and the softmax scale ``head_dim ** -0.5`` unchanged (stored as ``scaling``
by transformers 5, recomputed from ``attention_head_size`` by transformers 4), so the eager and the SDPA paths
compute what the masked model does (a zeroed value row gives the head a zero output, whatever its attention
pattern). The surgery writes back the module's head counts and width where it keeps them, and records the
removed query heads (original numbering) in ``config.pruned_heads`` as transformers 4 did;
``config.num_attention_heads`` keeps describing the unpruned architecture, which is what
:func:`fairpruner.load` rebuilds from. (``save_pretrained``/``from_pretrained`` cannot restore a pruned model:
the config has no per-layer widths. Use :func:`fairpruner.save`.)

The feed-forward (intermediate) units are ordinary torch-pruning groups (``intermediate.dense`` ->
``output.dense``, ``mlp.fc1`` -> ``mlp.fc2``, a gated MLP's ``gate_proj`` and ``up_proj`` -> ``down_proj``);
the hidden size is coupled to every LayerNorm or RMSNorm and stays. Because this family owns the attention
projections, torch-pruning never explores the attention's reshapes and rotary slices (where its search did
not end on a Llama decoder).
The parameters a ViT's embeddings module uses directly (class token, position table) sit on that residual
stream, which the core accepts for exactly that reason.

This module never imports ``transformers``: it only reads module attributes.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member
from .._core.layers import kept, slice_linear_, slice_param_
from .._errors import PlanError, UnsupportedModelError
from .._measure.counting import attention_macs
from .attention import AttentionOptions
from .base import Family, MacsTerm, PerModel, USource, hook_source, rank_units, register, units_by_rank

__all__ = ["HFAttentionHeads"]

_BERT_STYLE = ("query", "key", "value")
_PROJ_STYLE = ("q_proj", "k_proj", "v_proj")
_FUSED = "qkv_proj"  # Phi-3: the rows of every query head, then of every key head, then of every value head
TABLE = "relative_position_bias_table"


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
    prunable: bool  # False: an unknown attention layout, owned (kept from torch-pruning), never cut
    protected: Tuple[str, ...] = ()  # Linear layers of an unknown attention layout, kept whole
    kv_heads: int = 0  # key/value heads; fewer than ``heads`` under grouped-query attention

    @property
    def per_kv(self) -> int:
        """Query heads that share one key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads if self.kv_heads else 1

    @property
    def fused(self) -> bool:
        """One projection holds the queries, keys and values (Phi-3's ``qkv_proj``)."""
        return len(self.qkv) == 1

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
    if all(_linear(m, a) for a in (_FUSED, "o_proj")) and isinstance(getattr(m, "head_dim", None), int) and \
            isinstance(getattr(m, "num_key_value_heads", None), int):
        return (f"{name}.{_FUSED}",), f"{name}.o_proj", m.head_dim
    return None


def find_attention(model: nn.Module) -> List[_Attention]:
    """The Hugging Face self-attention modules of ``model``: those whose heads can be cut, and those whose
    projections must be kept whole (layouts this module does not know)."""
    modules = dict(model.named_modules())
    found = []
    for name, m in modules.items():
        if not _from_transformers(m):
            continue
        layout = _layout(modules, name, m)
        heads = _heads_of(m)
        if heads is None and layout is not None:
            # Llama-style decoders keep no head count on the module: their forward reshapes with -1 heads.
            heads = modules[layout[1]].in_features // layout[2]
        if heads is None and isinstance(getattr(m, "head_dim", None), int):
            heads = 0  # an attention of unknown layout without a head count
        if heads is None:
            continue
        if layout is None:
            # An unknown layout (DistilBERT's q_lin/out_lin, ALBERT, T5): torch-pruning alone would cut single
            # head dimensions and break the head reshape, so its projections are kept whole.
            linears = tuple(f"{name}.{n}" for n, c in m.named_children() if isinstance(c, nn.Linear))
            if linears:
                found.append(_Attention(name, (), "", heads, 0, False, linears))
            continue
        qkv, out, head_dim = layout
        if len(qkv) == 1:  # fused
            kv_heads = m.num_key_value_heads
            widths = (modules[qkv[0]].out_features, (heads + 2 * kv_heads) * head_dim)
        else:
            q, k, v = (modules[n] for n in qkv)
            kv_heads = k.out_features // head_dim if head_dim else 0
            widths = ((q.out_features, k.out_features, v.out_features),
                      (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim))
        prunable = (widths[0] == widths[1] and modules[out].in_features == heads * head_dim and kv_heads > 0
                    and heads % kv_heads == 0)
        found.append(_Attention(name, qkv, out, heads, head_dim, prunable, kv_heads=kv_heads))
    return found


@register
class HFAttentionHeads(Family):
    """Attention heads of Hugging Face ``transformers`` models (BERT, RoBERTa, ViT, DeiT ...)."""

    name = "hf_attention_heads"
    Options = AttentionOptions

    def __init__(self, options: Optional[AttentionOptions] = None) -> None:
        super().__init__(options)
        # Functional MACs counted inside each attention module (as fairpruner.count_macs counts them) for one
        # sample; one forward pass serves every group.
        self._attention_macs = PerModel(
            lambda model, x: attention_macs(model, x, functional={a.name for a in find_attention(model)}))
        self._per_kv: Dict[str, int] = {}  # query-head groups (gqa="query_heads") -> query heads per key/value head

    def claims(self, module: nn.Module) -> bool:
        # A per-head table is cut with its heads (discover); on heads that stay whole it is never cut.
        t = getattr(module, TABLE, None)
        return isinstance(t, nn.Parameter) and t.dim() == 2

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
            if not a.prunable or any(n in ignore for n in (a.name,) + a.linears):
                continue
            if a.per_kv > 1 and self.options.gqa == "query_heads":
                groups.append(self._query_group(model, a))
                continue
            if a.kv_heads < 2:
                continue
            # One unit per key/value head: its rows of k_proj and v_proj, the rows of the query heads that read
            # it (heads i * per_kv ... in the order repeat_kv expands them) and the same columns of o_proj.
            query = torch.arange(a.heads * a.head_dim).view(a.kv_heads, a.per_kv * a.head_dim)
            kv = torch.arange(a.kv_heads * a.head_dim).view(a.kv_heads, a.head_dim)
            if a.fused:  # a unit's query, key and value rows of the one projection
                q_rows, kv_rows = a.heads * a.head_dim, a.kv_heads * a.head_dim
                members = [Member(a.qkv[0], "out", torch.cat([query, kv + q_rows, kv + q_rows + kv_rows], 1),
                                  "weight")]
            else:
                members = [Member(n, "out", query if i == 0 else kv, "weight") for i, n in enumerate(a.qkv)]
            members.append(Member(a.out, "in", query, "weight"))
            table = _bias_table(model, a)
            if table is not None:  # one column per query head (Swin's relative position bias)
                heads = torch.arange(a.heads).view(a.kv_heads, a.per_kv)
                members.append(Member(table, "out", heads, "other", ((TABLE, 1),)))
            groups.append(GroupSpec(a.group_name, a.kv_heads, torch.arange(a.kv_heads).view(-1, 1), members,
                                    family=self))
        return groups

    def _query_group(self, model: nn.Module, a: _Attention) -> GroupSpec:
        """Query heads as root channels (key/value heads kept); placeholder units (position r of every key/value
        group) until :meth:`units_from_scores` matches them by rank."""
        query = torch.arange(a.heads * a.head_dim).view(a.heads, a.head_dim)
        members = [Member(a.qkv[0], "out", query, "weight"), Member(a.out, "in", query, "weight")]
        table = _bias_table(model, a)
        if table is not None:
            members.append(Member(table, "out", torch.arange(a.heads).view(-1, 1), "other", ((TABLE, 1),)))
        self._per_kv[a.group_name] = a.per_kv
        units = rank_units(torch.arange(a.heads).view(a.kv_heads, a.per_kv))
        return GroupSpec(a.group_name, a.heads, units, members, family=self)

    def units_from_scores(self, group: GroupSpec, u: torch.Tensor, r: torch.Tensor) -> Optional[torch.Tensor]:
        per = self._per_kv.get(group.name)
        if per is None:  # key/value groups: the units are fixed
            return None
        return units_by_rank(u, group.channels // per)  # unit k: the k-th lowest-U query head of every group

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        # A head's output is what the output projection reads: (B, T, heads * head_dim) -> (B, heads, T * d).
        out = next(m for m in group.members if m.side == "in")
        return [hook_source(group.name, out.module, side="input", index=out.index, channels_last=True)]

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        # The attention products (q k^T and attention x v, or one SDPA call) scale with the number of heads.
        name = group.name[: -len(":heads")]
        macs = self._attention_macs(model, example_inputs).get(name, 0)
        out = next(m.module for m in group.members if m.side == "in")  # its columns: the query heads kept
        return [(float(macs), (out, 1), None)] if macs else []

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        modules = dict(model.named_modules())
        name = group.name[: -len(":heads")]
        attn = next((a for a in find_attention(model) if a.name == name), None)
        if attn is not None and attn.prunable and attn.per_kv > 1 and group.channels == attn.heads:
            return _prune_query_heads(modules, model, attn, group, channels)
        if attn is None or not attn.prunable or attn.kv_heads != group.channels:
            cuttable = attn is not None and attn.prunable
            found = f"{attn.kv_heads} key/value heads" if cuttable else "no attention it can cut"
            raise PlanError(f"'{name}' has {found}, the plan expects {group.channels}. Apply a plan to an unpruned "
                            "instance of the architecture it was made for.")
        drop = sorted(set(int(c) for c in channels))
        keep = kept(attn.kv_heads, torch.tensor(drop, dtype=torch.long))
        for mem in group.members:
            if mem.params == ((TABLE, 1),):
                slice_param_(modules[mem.module], TABLE, 1, mem.index[keep].flatten())
                continue
            # Sorted: a fused projection keeps its [queries | keys | values] order.
            slice_linear_(modules[mem.module], 0 if mem.side == "out" else 1, mem.index[keep].flatten().sort().values)
        module = modules[name]
        per = attn.per_kv
        _record_pruned_heads(modules, name, getattr(model, "config", None) or getattr(module, "config", None),
                             attn.heads, [h * per + j for h in drop for j in range(per)])
        # head_dim, the softmax scale and the query heads per key/value head are unchanged; the forward reshapes
        # with -1 heads, but transformers 4 reads the head count and width attributes.
        for attr, value in (("num_attention_heads", len(keep) * per), ("num_heads", len(keep) * per),
                            ("num_key_value_heads", len(keep)),
                            ("all_head_size", len(keep) * per * attn.head_dim)):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value)
        if attn.fused:
            # Phi-3 reads the query width from its config, shared by every layer: this layer gets its own copy.
            config = copy.copy(module.config)
            config.num_attention_heads, config.num_key_value_heads = len(keep) * per, len(keep)
            module.config = config


def _prune_query_heads(modules: Dict[str, nn.Module], model: nn.Module, attn: _Attention, group: GroupSpec,
                       channels: List[int]) -> None:
    """Removes query heads, the same number from every key/value group; the key/value heads stay."""
    drop = torch.tensor(sorted(set(int(c) for c in channels)), dtype=torch.long)
    per_group = torch.bincount(drop // attn.per_kv, minlength=attn.kv_heads)
    if not bool((per_group == per_group[0]).all()) or int(per_group[0]) >= attn.per_kv:
        raise PlanError(f"Every key/value group of '{attn.name}' must lose the same number of query heads and keep "
                        f"one; the plan removes {per_group.tolist()} of {attn.per_kv}. Use a plan made for it.")
    keep = kept(attn.heads, drop)
    for mem in group.members:
        if mem.params == ((TABLE, 1),):
            slice_param_(modules[mem.module], TABLE, 1, mem.index[keep].flatten())
            continue
        rows = mem.index[keep].flatten()
        if attn.fused and mem.side == "out":  # the key and value rows after the queries stay
            q_rows = attn.heads * attn.head_dim
            rows = torch.cat([rows, torch.arange(q_rows, modules[mem.module].out_features)])
        slice_linear_(modules[mem.module], 0 if mem.side == "out" else 1, rows)
    module, per, heads = modules[attn.name], attn.per_kv - int(per_group[0]), len(keep)
    _record_pruned_heads(modules, attn.name, getattr(model, "config", None) or getattr(module, "config", None),
                         attn.heads, drop.tolist())
    for attr, value in (("num_attention_heads", heads), ("num_heads", heads), ("num_key_value_groups", per),
                        ("all_head_size", heads * attn.head_dim)):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)
    if attn.fused:  # Phi-3 reads the query width from its (shared) config: this layer gets its own copy
        module.config = copy.copy(module.config)
        module.config.num_attention_heads = heads


def _bias_table(model: nn.Module, a: _Attention) -> Optional[str]:
    """The module holding ``a``'s per-head relative position bias table (``(positions, heads)``): the attention
    itself or its ``relative_position_bias`` child; None if it has none."""
    for name in (a.name, f"{a.name}.relative_position_bias"):
        try:
            t = getattr(model.get_submodule(name), TABLE, None)
        except AttributeError:
            continue
        if isinstance(t, nn.Parameter) and t.dim() == 2 and t.shape[1] == a.heads:
            return name
    return None


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
    if config is not None and not _replays_pruned_heads(modules.get("")):
        config = None
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


def _replays_pruned_heads(root: Optional[nn.Module]) -> bool:
    """False where a model built from a config holding ``pruned_heads`` would fail: transformers 4 replays the
    record at construction through ``prune_heads``, which decoders (Llama, Qwen2, ...) do not implement."""
    if root is None or not hasattr(root, "prune_heads"):
        return True  # transformers 5 reads no such record: it is kept as documentation of the cut
    return hasattr(getattr(root, "base_model", root), "_prune_heads")

