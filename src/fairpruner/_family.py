"""Unit families that torch-pruning's dependency graph cannot express: attention heads, recurrent hidden
units, mixture-of-experts experts.

A :class:`Family` finds its own groups (as :class:`~fairpruner._graph.GroupSpec` with ``family`` set), says
where each group's U-Score is observed (:class:`USource`), which parameter slices belong to each unit (the
groups' members, with explicit ``params``), what MACs scale with the units, and performs the surgery. Scoring,
planning, masking and the cost model stay generic: they only read members.

Families register themselves in :data:`FAMILIES` when their module is imported (``fairpruner/__init__``
imports all of them).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._graph import GroupSpec

__all__ = ["Family", "USource", "FAMILIES", "register", "family_of", "claimed_by_family", "family_options",
           "family_option",
           "hook_source", "MacsTerm"]

# (macs, axis key, axis key): MACs of one sample that scale with the kept fraction of up to two axes. An axis
# key is ``(module, param, dim)`` for members with explicit params, else ``(module, 0 | 1)`` (out | in).
MacsTerm = Tuple[float, Optional[tuple], Optional[tuple]]


@dataclass
class USource:
    """Where the per-unit outputs of a family group are observed during the scoring pass.

    Attributes:
        name: a stable label (seeds the random projections, names the site in errors).
        attach: ``attach(modules, emit) -> list of hook handles``; the hooks call ``emit(t)`` once per forward
            with ``t`` shaped ``(batch, channels, *features)`` in batch order (``channels`` = the group's root
            channels), e.g. ``(B, heads, T * head_dim)``.
    """

    name: str
    attach: Callable[[Dict[str, nn.Module], Callable[[torch.Tensor], None]], List[Any]]


class Family:
    """Base class of a unit family. Subclasses set ``name`` and override the methods."""

    name = "family"

    def claims(self, module: nn.Module) -> bool:
        """True for modules this family makes acceptable to the layer check (e.g. ``nn.LSTM``)."""
        return False

    def tp_pruners(self) -> Dict[type, Any]:
        """``customized_pruners`` for torch-pruning's graph (module type -> pruner), if the family has any."""
        return {}

    def owned(self, model: nn.Module) -> List[str]:
        """Modules torch-pruning must not root or prune groups at, because this family handles them."""
        return []

    def tracing(self, model: nn.Module) -> Any:
        """A context manager entered while torch-pruning traces ``model`` (e.g. hooks that hide a layer's
        internal operations, which the library would misread, behind one node)."""
        return contextlib.nullcontext()

    def layout(self, module: nn.Module, side: str) -> Optional[Tuple[Tuple[str, int], ...]]:
        """Explicit ``(param, dim)`` pairs of a module this family claims when it is a member (``side``) of a
        torch-pruning group, e.g. an LSTM's input columns; None: laid out like Conv/Linear."""
        return None

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        """This family's groups in ``model`` (``ignore``: module names the user or the output layer protect)."""
        return []

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        """Where U is observed for ``group``."""
        raise NotImplementedError

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        """MACs outside Conv/Linear layers that shrink with ``group``'s units (attention products, recurrent
        matmuls). Their sum is taken out of the cost model's constant part."""
        return []

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        """Removes root ``channels`` of ``group`` from ``model`` in place, keeping module attributes consistent."""
        raise NotImplementedError

    def mask_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        """Zeroes what :meth:`prune_` would remove, so that the masked model computes what the pruned one does.
        By default every member's parameter slices are zeroed; override where zero is not neutral (a router
        logit must become -inf, not 0)."""
        zero_members_(model, group, channels)


def zero_members_(model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
    """Zeroes the parameter slices of every member of ``group`` that belong to root ``channels``."""
    from ._scoring import member_params
    modules = dict(model.named_modules())
    chans = torch.tensor(sorted(channels), dtype=torch.long)
    with torch.no_grad():
        for mem in group.members:
            mod = modules[mem.module]
            if mem.params is None and mem.side == "in" and isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
                continue  # depthwise: its input channels are its output channels
            if mem.owner is not None:  # a module that belongs wholly to one root channel
                if mem.owner in channels:
                    for p, _ in member_params(mem, mod):
                        p.zero_()
                continue
            pos = mem.index.index_select(0, chans).flatten()
            for p, dim in member_params(mem, mod):
                p.index_fill_(dim, pos.to(p.device), 0.0)


def family_groups(model: nn.Module, graph: Any, example_inputs: tuple, ignore: Sequence[str]) -> Dict[str, tuple]:
    """Every registered family's groups in ``model``: group name -> (family, group)."""
    out: Dict[str, tuple] = {}
    for fam in FAMILIES:
        for g in fam.discover(model, graph, example_inputs, tuple(ignore)):
            out[g.name] = (fam, g)
    return out


FAMILIES: List[Family] = []

# Options that change which units a family discovers (e.g. attention="head_dims"). fairpruner.score sets them
# and records them in the scores' metadata; prune/mask/load restore them from the plan, so that a family
# finds the same groups again. Families read them with family_option() inside discover().
_OPTIONS: "contextvars.ContextVar[Dict[str, Any]]" = contextvars.ContextVar("fairpruner_family_options", default={})


@contextlib.contextmanager
def family_options(**options: Any) -> Iterator[None]:
    """Sets unit-family options for the code inside the ``with`` block."""
    token = _OPTIONS.set({**_OPTIONS.get(), **options})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def family_option(name: str, default: Any = None) -> Any:
    """The value of a unit-family option set by :func:`family_options` (``default`` when unset)."""
    return _OPTIONS.get().get(name, default)


def register(family: Family) -> Family:
    """Adds a family (once) to the registry that scoring and surgery consult."""
    if all(type(f) is not type(family) for f in FAMILIES):
        FAMILIES.append(family)
    return family


def family_of(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"unknown unit family {name!r}")


def claimed_by_family(module: nn.Module) -> bool:
    return any(f.claims(module) for f in FAMILIES)


def family_layout(module: nn.Module, side: str) -> Optional[Tuple[Tuple[str, int], ...]]:
    """The first explicit parameter layout a registered family gives ``module`` (see :meth:`Family.layout`)."""
    for f in FAMILIES:
        found = f.layout(module, side)
        if found is not None:
            return found
    return None


def hook_source(name: str, module: str, *, side: str = "output", item: Optional[int] = None,
                index: Optional[torch.Tensor] = None, channels_last: bool = True) -> USource:
    """A source reading one module's output (or input) tensor.

    Args:
        name: label of the source.
        module: qualified module name.
        side: "output" (forward hook) or "input" (pre-hook, first positional input).
        item: position in a tuple output (``nn.LSTM`` returns ``(output, (h, c))``).
        index: (channels, k) positions in the feature dimension of each root channel; None keeps all.
        channels_last: the feature dimension is the last one (``(B, T, D)`` tokens) rather than dimension 1.
    """
    def attach(modules: Dict[str, nn.Module], emit: Callable[[torch.Tensor], None]) -> List[Any]:
        def take(t: Any) -> None:
            if item is not None:
                t = t[item]
            x = t.movedim(-1, 1) if channels_last and t.dim() > 2 else t
            if index is not None:
                idx = index.to(x.device)
                x = x.index_select(1, idx.flatten())
                x = x.unflatten(1, tuple(idx.shape))  # (B, channels, k, *rest)
                x = x.movedim(2, -1).flatten(2) if x.dim() > 3 else x.flatten(2)
            emit(x)
        mod = modules[module]
        if side == "output":
            return [mod.register_forward_hook(lambda m, i, o: take(o))]
        return [mod.register_forward_pre_hook(lambda m, i: take(i[0]))]
    return USource(name, attach)
