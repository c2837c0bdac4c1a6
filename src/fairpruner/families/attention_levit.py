"""LeViT attention (``transformers``' ``LevitAttention`` and ``LevitAttentionSubsample``): whole heads as units.

A LeViT attention module projects with Linear + BatchNorm pairs (``MLPLayerWithBN``: ``.linear``,
``.batch_norm``) and adds a learned per-head bias table, ``attention_biases`` of shape ``(heads, offsets)``.
Recognised by its attributes (``num_attention_heads``, ``key_dim``, ``attention_ratio``, ``attention_biases``,
``projection``, and ``queries_keys_values`` or ``keys_values`` + ``queries``), on classes defined in
``transformers``.

A head owns a contiguous block of the fused projection's rows (``2 key_dim + ratio key_dim`` for
``queries_keys_values``; ``key_dim + ratio key_dim`` of ``keys_values`` and ``key_dim`` of ``queries`` in the
subsampling variant, which the forward splits per head after ``view(..., heads, -1)``), the same BatchNorm
channels, its ``ratio key_dim`` input columns of ``projection.linear`` and its row of ``attention_biases``. U is
read where the projection reads the heads. The surgery writes back ``num_attention_heads``,
``out_dim_keys_values`` and ``out_dim_projection`` and clears the module's eval-mode bias cache. Masking zeroes
the rows with their BatchNorm scale and shift, so the head's values, and with them its output, are zero.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member
from .._core.layers import kept, slice_linear_, slice_param_
from .._errors import PlanError
from .._measure.counting import attention_macs
from .base import Family, MacsTerm, PerModel, USource, hook_source, register

__all__ = ["LevitHeads", "levit_attention"]

BIASES = "attention_biases"


def _is_levit(m: nn.Module) -> bool:
    b = getattr(m, BIASES, None)
    return type(m).__module__.startswith("transformers.") and isinstance(b, nn.Parameter) and b.dim() == 2 and \
        all(isinstance(getattr(m, a, None), int) for a in ("num_attention_heads", "key_dim", "attention_ratio")) and \
        hasattr(m, "projection") and (hasattr(m, "queries_keys_values") or hasattr(m, "keys_values"))


def levit_attention(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every LeViT attention module in ``model``."""
    return [(n, m) for n, m in model.named_modules() if _is_levit(m)]


def _projections(name: str, m: nn.Module) -> List[Tuple[str, int]]:
    """The fused input projections (qualified name of their MLPLayerWithBN) and each head's block width."""
    kd, r = m.key_dim, m.attention_ratio
    if hasattr(m, "queries_keys_values"):
        return [(f"{name}.queries_keys_values", 2 * kd + r * kd)]
    return [(f"{name}.keys_values", kd + r * kd), (f"{name}.queries", kd)]


def _slice_bn_(bn: nn.BatchNorm1d, keep: torch.Tensor) -> None:
    for attr in ("weight", "bias"):
        if getattr(bn, attr) is not None:
            slice_param_(bn, attr, 0, keep)
    for attr in ("running_mean", "running_var"):
        buf = getattr(bn, attr)
        if buf is not None:
            setattr(bn, attr, buf.index_select(0, keep.to(buf.device)).clone())
    bn.num_features = len(keep)


class _OnRemove:
    """A hook handle whose removal runs ``fn`` (a forward cut short by the scoring passes skips post-hooks)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remove(self) -> None:
        self.fn()


@register
class LevitHeads(Family):
    """Heads of LeViT attention modules (see the module docstring)."""

    name = "levit_heads"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        # One forward pass counts the products inside every LeViT attention module.
        self._attention_macs = PerModel(
            lambda model, x: attention_macs(model, x, functional=[n for n, _ in levit_attention(model)]))

    def claims(self, module: nn.Module) -> bool:
        return _is_levit(module)

    def owned(self, model: nn.Module) -> List[str]:
        out = []
        for name, m in levit_attention(model):
            for proj, _ in _projections(name, m):
                out += [f"{proj}.linear", f"{proj}.batch_norm"]
            out.append(f"{name}.projection.linear")
        return out

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        groups = []
        for name, m in levit_attention(model):
            heads = m.num_attention_heads
            if heads < 2 or any(n == name or n.startswith(name + ".") for n in ignore):
                continue
            members = []
            for proj, width in _projections(name, m):
                rows = torch.arange(heads * width).view(heads, width)
                members += [Member(f"{proj}.linear", "out", rows, "weight"),
                            Member(f"{proj}.batch_norm", "out", rows, "norm")]
            value = m.attention_ratio * m.key_dim
            members.append(Member(f"{name}.projection.linear", "in", torch.arange(heads * value).view(heads, value),
                                  "weight"))
            members.append(Member(name, "out", torch.arange(heads).view(-1, 1), "other", ((BIASES, 0),)))
            groups.append(GroupSpec(f"{name}:heads", heads, torch.arange(heads).view(-1, 1), members, family=self))
        return groups

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        reader = next(m for m in group.members if m.side == "in")
        source = hook_source(group.name, reader.module, side="input", index=reader.index, channels_last=True)
        name = group.name[: -len(":heads")]

        def attach(modules: Dict[str, nn.Module], emit: Any) -> List[Any]:
            # In eval mode the module caches its biases, built with gradients on the first batch; every later
            # backward would run into that batch's freed graph. The cache is emptied around each forward.
            def clear(*_: Any) -> None:
                modules[name].attention_bias_cache = {}
            return source.attach(modules, emit) + [modules[name].register_forward_pre_hook(clear),
                                                   modules[name].register_forward_hook(clear), _OnRemove(clear)]
        return [USource(source.name, attach)]

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        # q k^T and attention x v run as matrix products inside the module; they scale with the heads.
        name = group.name[: -len(":heads")]
        macs = self._attention_macs(model, example_inputs).get(name, 0)
        return [(float(macs), (group.members[0].module, 0), None)] if macs else []

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        name = group.name[: -len(":heads")]
        m = model.get_submodule(name)
        if m.num_attention_heads != group.channels:
            raise PlanError(f"'{name}' has {m.num_attention_heads} heads, the plan expects {group.channels}. Apply "
                            "a plan to an unpruned instance of the architecture it was made for.")
        keep = kept(group.channels, torch.tensor(channels, dtype=torch.long))
        for mem in group.members:
            module = model.get_submodule(mem.module)
            rows = mem.index[keep].flatten()
            if mem.params is not None:
                slice_param_(module, BIASES, 0, rows)
            elif isinstance(module, nn.Linear):
                slice_linear_(module, 0 if mem.side == "out" else 1, rows)
            else:
                _slice_bn_(module, rows)
        kd, r, h = m.key_dim, m.attention_ratio, len(keep)
        m.num_attention_heads = h
        m.out_dim_projection = r * kd * h
        m.out_dim_keys_values = _projections(name, m)[0][1] * h  # the fused keys(-queries)-values block per head
        m.attention_bias_cache = {}  # eval-mode cache of the (heads, points, points) biases

    def mask_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        super().mask_(model, group, channels)
        model.get_submodule(group.name[: -len(":heads")]).attention_bias_cache = {}
