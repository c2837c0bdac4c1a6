"""GPT-2-style blocks built from ``transformers``' ``Conv1D``: attention heads of the packed ``c_attn`` and the
hidden units of the ``c_fc`` -> ``c_proj`` MLP, as one unit family.

``Conv1D`` is a Linear layer with its weight transposed (``[in, out]``, ``y = x @ W + b``); torch-pruning has no
pruner for it, so this family finds the blocks by their attributes and lays the parameters out itself:

* attention (``c_attn``, ``c_proj``, ``num_heads``, ``head_dim``, ``split_size``; GPT-2, and any module of the
  same shape): a unit is one head, its ``head_dim`` columns in each of the query, key and value thirds of
  ``c_attn`` (weight dim 1, bias) and the same rows of ``c_proj`` (weight dim 0). U is read where ``c_proj``
  reads the heads. The surgery writes back ``num_heads`` and ``split_size`` (the width ``c_attn``'s output is
  split by); ``head_dim`` and the softmax scale stay. Cross-attention (a ``q_attn``) is kept whole.
* MLP (``c_fc`` -> ``c_proj``): a unit is one hidden unit, U at ``c_fc``'s output.

The hidden size (embeddings, LayerNorms, the residual stream) is kept, as for every transformer. MACs of the
``Conv1D`` products and of the attention products are the family's MACs terms, so predicted and counted MACs
agree. This module never imports ``transformers``: it only reads module attributes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member
from .._core.layers import kept, slice_param_
from .._core.state import eval_mode
from .._errors import PlanError
from .._measure.counting import attention_macs
from .base import Family, MacsTerm, PerModel, USource, hook_source, register

__all__ = ["Conv1DBlocks", "is_conv1d"]

OUT = (("weight", 1), ("bias", 0))  # a Conv1D's output features: weight columns and the bias
IN = (("weight", 0),)               # its input features: weight rows


def is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (recognised by name and layout: weight ``[nx, nf]``)."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2 and \
        tuple(w.shape) == (getattr(module, "nx", -1), getattr(module, "nf", -1))


def _blocks(model: nn.Module) -> List[Tuple[str, str, nn.Module]]:
    """``(kind, name, module)`` of every GPT-2-style attention ("attn") and MLP ("mlp") block."""
    found = []
    for name, m in model.named_modules():
        c_proj = getattr(m, "c_proj", None)
        if not (c_proj is not None and is_conv1d(c_proj)):
            continue
        attn = getattr(m, "c_attn", None)
        if attn is not None and is_conv1d(attn) and all(isinstance(getattr(m, a, None), int)
                                                          for a in ("num_heads", "head_dim", "split_size")):
            found.append(("attn", name, m))
        elif is_conv1d(getattr(m, "c_fc", None) or nn.Identity()):
            found.append(("mlp", name, m))
    return found


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


@register
class Conv1DBlocks(Family):
    """Heads and MLP units of GPT-2-style blocks (``transformers``' transposed-weight ``Conv1D`` layers)."""

    name = "conv1d_blocks"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._counts = PerModel(_counts)

    def claims(self, module: nn.Module) -> bool:
        return is_conv1d(module)

    def owned(self, model: nn.Module) -> List[str]:
        return [n for n, m in model.named_modules() if is_conv1d(m)]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        groups = []
        for kind, name, m in _blocks(model):
            p = _prefix(name)
            names = (f"{p}c_attn", f"{p}c_proj") if kind == "attn" else (f"{p}c_fc", f"{p}c_proj")
            if any(n in ignore for n in (name,) + names):
                continue
            if kind == "attn":
                heads, d = m.num_heads, m.head_dim
                if hasattr(m, "q_attn") or heads < 2 or m.c_attn.nf != 3 * heads * d or m.c_proj.nx != heads * d:
                    continue  # cross-attention, or a layout this family does not know: kept whole
                rows = torch.arange(heads * d).view(heads, d)
                qkv = torch.cat([rows + k * heads * d for k in range(3)], 1)  # a head's q, k and v columns
                members = [Member(names[0], "out", qkv, "weight", OUT), Member(names[1], "in", rows, "weight", IN)]
                groups.append(GroupSpec(f"{name}:heads", heads, torch.arange(heads).view(-1, 1), members, family=self))
            else:
                width = m.c_fc.nf
                if width < 2 or m.c_proj.nx != width:
                    continue
                rows = torch.arange(width).view(-1, 1)
                members = [Member(names[0], "out", rows, "weight", OUT), Member(names[1], "in", rows, "weight", IN)]
                groups.append(GroupSpec(f"{name}:units", width, rows.clone(), members, family=self))
        return groups

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        if group.name.endswith(":heads"):  # what c_proj reads: (B, T, heads * head_dim) -> (B, heads, T * d)
            reader = group.members[1]
            return [hook_source(group.name, reader.module, side="input", index=reader.index, channels_last=True)]
        return [hook_source(group.name, group.members[0].module, side="output", channels_last=True)]

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        # Each Conv1D's product scales with the axis this group cuts; attention products with the heads.
        modules = dict(model.named_modules())
        tokens, inside = self._counts(model, example_inputs)
        terms: List[MacsTerm] = []
        for mem in group.members:
            layer = modules[mem.module]
            axis = (mem.module, "weight", 1 if mem.side == "out" else 0)
            terms.append((float(tokens.get(mem.module, 0) * layer.nx * layer.nf), axis, None))
        if group.name.endswith(":heads"):
            # The attention module also runs its two Conv1D products; the rest are q k^T and attention x v.
            products = inside.get(group.name[: -len(":heads")], 0) - sum(t[0] for t in terms)
            if products > 0:
                terms.append((float(products), (group.members[0].module, "weight", 1), None))
        return terms

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        modules = dict(model.named_modules())
        block = modules[group.name.rpartition(":")[0]]
        first = modules[group.members[0].module]
        expected = first.nf // 3 if group.name.endswith(":heads") else first.nf
        per = group.members[0].index.shape[1] // (3 if group.name.endswith(":heads") else 1)
        if expected // per != group.channels:
            raise PlanError(f"'{group.name}' has {expected // per} units, the plan expects {group.channels}. Apply "
                            "a plan to an unpruned instance of the architecture it was made for.")
        keep = kept(group.channels, torch.tensor(channels, dtype=torch.long))
        for mem in group.members:
            cols = mem.index[keep]
            if group.name.endswith(":heads") and mem.side == "out":
                cols = cols.view(len(keep), 3, -1).transpose(0, 1)  # c_attn stays [q heads | k heads | v heads]
            _slice_conv1d_(modules[mem.module], mem.side, cols.flatten())
        if group.name.endswith(":heads"):
            block.num_heads = len(keep)
            block.split_size = len(keep) * block.head_dim


def _slice_conv1d_(layer: nn.Module, side: str, keep: torch.Tensor) -> None:
    """Keeps output features (``side="out"``: weight columns and bias) or input features (weight rows)."""
    if side == "out":
        slice_param_(layer, "weight", 1, keep)
        if getattr(layer, "bias", None) is not None:
            slice_param_(layer, "bias", 0, keep)
        layer.nf = len(keep)
    else:
        slice_param_(layer, "weight", 0, keep)
        layer.nx = len(keep)


def _counts(model: nn.Module, x: tuple) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Rows each Conv1D multiplies for one sample, and the MACs counted inside each attention block."""
    rows: Dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: rows.__setitem__(
        n, rows.get(n, 0) + inp[0].numel() // mod.nx)) for n, m in model.named_modules() if is_conv1d(m)]
    try:
        with eval_mode(model), torch.no_grad():
            model(*x)
    finally:
        for h in hooks:
            h.remove()
    return rows, attention_macs(model, x, functional=[n for k, n, _ in _blocks(model) if k == "attn"])
