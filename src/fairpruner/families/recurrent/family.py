"""Hidden units of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) as a unit family.

A unit is hidden index ``h`` of one layer of a recurrent module, both directions together (they share
``hidden_size``). It owns the gate-block rows ``g * H + h`` of that layer's ``weight_ih``, ``weight_hh`` and
biases (4 blocks for LSTM, 3 for GRU, 1 for RNN, both directions), the recurrent columns ``h`` of
``weight_hh``, and the input columns that read it: the next layer's ``weight_ih`` columns ``h`` and ``H + h``,
or the input columns of the layers that read the module's output sequence or ``h_n``/``c_n``. With a zero
initial state, a unit whose gate rows are zero stays exactly 0 (``c`` too) at every step, so pruning equals
masking. Initial states passed to the layer and packed sequences are refused.

torch-pruning sees each recurrent module as one opaque node while it traces (hooks make the output depend
on the input only, hiding the unrolled kernels whose operations it would misread), and a customized pruner
cuts the module's input columns when a producer layer loses channels. Which input positions of which
layers read which unit is found by NaN tagging: the units whose global index has bit ``b`` equal to ``v``
are set to NaN in the module's outputs, one forward per ``(b, v)``; every parametrised layer records the
NaN positions of its input and passes zeros on. A position read by one unit is NaN in exactly one pass of
each bit pair, and its pattern spells the unit's index; anything else (a LayerNorm or a sum over the hidden
dimension) is caught. This handles ``output[:, -1]``, ``h_n[-1]``, direction concatenations and time-major
flattening alike. Units that cannot go one by one stay: those that reach the model output, a LayerNorm, a
residual addition with another layer, or a layer whose inputs a torch-pruning group also cuts.

U is measured on each layer's output sequence (an inner layer's is recomputed in the hook), per unit the
vector over time steps and directions. The cost model counts every recurrent layer's matmuls as steps times
each weight matrix's size, scaled by the members' explicit axes, so predicted MACs are exact.

``nn.LSTM``/``nn.GRU`` hold one ``hidden_size`` for all layers. When the layers of a pruned module keep
different counts it is replaced by a :class:`RecurrentStack` of single-layer modules with the same call
signature; its ``h_n`` (and ``c_n``) is then a tuple of ``(batch, H_k)`` tensors, one per layer and
direction in ``nn.LSTM``'s order, so ``h_n[-1]`` and ``torch.cat([h_n[-2], h_n[-1]], 1)`` keep working.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from ..._core.groups import GroupSpec, Member
from ..._core.layers import CONV_TYPES, WEIGHT_TYPES, freezes, replace_module
from ..._errors import FairPrunerError, UnsupportedModelError
from ..base import Family, USource, register
from .layers import (GATES, RNN_TYPES, RecurrentStack, cut_hidden_, cut_input_, directions, input_width,
                     join_layers, param_names, per_unit, run_layers, split_layers)
from .probe import probe

__all__ = ["RecurrentFamily", "RecurrentStack"]


@dataclass
class RecurrentGroup(GroupSpec):
    """A layer's hidden units: ``module`` (qualified name), ``layer`` index and the input ``widths`` of the
    outside layers that read the units."""

    module: str = ""
    layer: int = 0
    widths: Dict[str, int] = field(default_factory=dict)


class _Opaque(torch.autograd.Function):
    """Gives a recurrent module's output a single autograd node whose only input is the module's input."""

    @staticmethod
    def forward(ctx, x, anchor, value):  # noqa: D102 - autograd protocol
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - never called: only torch-pruning's tracing sees this node
        return None, None, None


def _opaque_output(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    x, (seq, state) = args[0] if args else kwargs["input"], out
    anchor = torch.zeros((), requires_grad=True)  # a grad_fn even where the input needs no gradient
    if isinstance(seq, nn.utils.rnn.PackedSequence):
        seq = seq._replace(data=_Opaque.apply(x.data, anchor, seq.data.detach()))
        node = seq.data
    else:
        seq = node = _Opaque.apply(x, anchor, seq.detach())
    # h_n/c_n hang off the module's node, so that what lies upstream stays in the graph when only they are read
    # (which positions they feed is found by NaN tagging, not from this link).
    state = tuple(_Opaque.apply(node, anchor, s.detach()) for s in state) if isinstance(state, tuple) \
        else _Opaque.apply(node, anchor, state.detach())
    return seq, state


class _TPPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's view of a recurrent module: it may lose input columns (a producer layer lost channels);
    its hidden units are cut by :class:`RecurrentFamily`."""

    TARGET_MODULES = RNN_TYPES

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise FairPrunerError("Hidden units of recurrent layers are cut by fairpruner's recurrent family, "
                              "not through torch-pruning.")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        cut_input_(layer, torch.tensor(sorted(set(int(i) for i in idxs)), dtype=torch.long))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.hidden_size * directions(layer)

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.input_size


def _reader_index(name: str, key: str, units: torch.Tensor, layer: int, h: int) -> Optional[torch.Tensor]:
    """(h, k) input positions of reader ``key`` for each unit of ``layer``; None when it reads none."""
    pos = ((units >= layer * h) & (units < (layer + 1) * h)).nonzero().flatten()
    if pos.numel() == 0:
        return None
    unit = units[pos] - layer * h
    counts = torch.bincount(unit, minlength=h)
    if bool((counts != counts[0]).any()):
        raise UnsupportedModelError(
            f"Layer '{key}' reads only some hidden units of layer {layer} of '{name}' (or some more often than "
            f"others); each unit must reach it the same way. Add '{name}' to `ignore=`.")
    return pos[torch.argsort(unit * units.numel() + pos)].view(h, -1)


@contextlib.contextmanager
def _removed_on_exit(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ the family

@register
class RecurrentFamily(Family):
    """Hidden units of ``nn.LSTM`` (without ``proj_size``), ``nn.GRU`` and ``nn.RNN`` layers."""

    name = "recurrent"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        # model -> consumer name -> (input width before pruning, original positions removed so far): several
        # groups may cut one consumer (h_n of two layers, two recurrent modules), each in original positions.
        self._cuts: "weakref.WeakKeyDictionary[nn.Module, Dict[str, tuple]]" = weakref.WeakKeyDictionary()

    def claims(self, module: nn.Module) -> bool:
        return type(module) in RNN_TYPES and not getattr(module, "proj_size", 0)

    def tp_pruners(self) -> Dict[type, Any]:
        pruner = _TPPruner()
        return {t: pruner for t in RNN_TYPES}

    def owned(self, model: nn.Module) -> List[str]:
        return [n for n, m in model.named_modules() if self.claims(m)]

    def tracing(self, model: nn.Module):
        handles = [m.register_forward_hook(_opaque_output, with_kwargs=True) for m in model.modules()
                   if self.claims(m)]
        return _removed_on_exit(handles)

    def layout(self, module: nn.Module, side: str) -> Optional[Tuple[Tuple[str, int], ...]]:
        if side == "in" and self.claims(module):
            return tuple((n, 1) for n in param_names(module, 0, ("weight_ih",)))
        return None

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        modules = dict(model.named_modules())
        groups: List[GroupSpec] = []
        for name, mod in modules.items():
            if not self.claims(mod) or name in ignore:
                continue
            groups.extend(self._discover_one(model, modules, graph, name, mod, example_inputs))
        return groups

    def _discover_one(self, model, modules, graph, name, mod, x) -> List[GroupSpec]:
        if name == "":
            raise UnsupportedModelError("The model is a bare recurrent layer; wrap it with a classifier head.")
        decoded, steps = probe(model, name, mod, x)
        if not steps:
            return []  # not called by the model
        n_layers, h, d = mod.num_layers, mod.hidden_size, directions(mod)
        gates = GATES[mod.mode]
        drop = set()
        readers: Dict[int, List[Member]] = {k: [] for k in range(n_layers)}
        for key, units in decoded.items():
            layers = {int(u) // h for u in units[units >= 0].unique()}
            reader = modules.get(key)
            if key == "" or (reader is not None and freezes(reader)):
                drop |= layers  # units that reach the output, or a LayerNorm/embedding, stay
                continue
            if isinstance(reader, CONV_TYPES) and reader.groups != 1 or \
                    not isinstance(reader, WEIGHT_TYPES) and not self.claims(reader):
                raise UnsupportedModelError(
                    f"Layer '{key}' ({type(reader).__name__}) reads hidden units of '{name}'; recurrent units can "
                    "be removed only where Linear, Conv (groups=1), LSTM, GRU or RNN layers read them (through "
                    f"element-wise ops, indexing, concatenation and reshapes). Add '{name}' to `ignore=`.")
            if _shares_inputs(graph, modules, key):
                drop |= layers  # the reader's inputs are also cut by a torch-pruning group: keep these units
                continue
            for k in layers:
                index = _reader_index(name, key, units, k, h)
                kind = "weight" if isinstance(reader, WEIGHT_TYPES) else "other"
                readers[k].append(Member(key, "in", index, kind, self.layout(reader, "in")))
        if _coupled_output(graph, modules, name, mod):
            drop.add(n_layers - 1)  # its output is added to another layer's: torch-pruning cannot follow
        groups = []
        for k in range(n_layers):
            if k in drop or h < 2:
                continue
            rows = (torch.arange(gates)[None] * h + torch.arange(h)[:, None])
            members = [Member(name, "out", rows, "weight", tuple((p, 0) for p in param_names(mod, k))),
                       Member(name, "in", torch.arange(h)[:, None], "other",
                              tuple((p, 1) for p in param_names(mod, k, ("weight_hh",))))]
            if k + 1 < n_layers:
                members.append(Member(name, "in", torch.arange(h)[:, None] + h * torch.arange(d)[None], "other",
                                      tuple((p, 1) for p in param_names(mod, k + 1, ("weight_ih",)))))
            members += readers[k]
            widths = {m.module: input_width(modules[m.module]) for m in readers[k]}
            groups.append(RecurrentGroup(f"{name}:layer{k}", h, torch.arange(h)[:, None], members, self,
                                         module=name, layer=k, widths=widths))
        return groups

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        k = group.layer

        def attach(modules, emit):
            def hook(mod, args, kwargs, out):
                if k == mod.num_layers - 1:
                    seq = out[0]
                else:  # an inner layer's output sequence is not returned: recompute it
                    with torch.no_grad():
                        seq = run_layers(mod, args[0] if args else kwargs["input"], k)
                emit(per_unit(seq, mod))
            return [modules[group.module].register_forward_hook(hook, with_kwargs=True)]
        return [USource(group.name, attach)]

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        removed = torch.tensor(sorted(channels), dtype=torch.long)
        mod = model.get_submodule(group.module)
        layers = split_layers(mod)
        cut_hidden_(layers, group.layer, removed)
        new = join_layers(layers, mod.dropout)
        if new is not mod:
            new.train(mod.training)  # new modules start in training mode; keep the caller's (eval) mode
            replace_module(model, group.module, new)
        for layer in (new.layers if isinstance(new, RecurrentStack) else [new]):
            layer.flatten_parameters()
        cuts = self._cuts.setdefault(model, {})
        for mem in group.members:
            if mem.module == group.module:
                continue
            reader = model.get_submodule(mem.module)
            width, done = cuts.get(mem.module, (group.widths[mem.module], torch.zeros(0, dtype=torch.long)))
            if width != group.widths[mem.module] or input_width(reader) != width - done.numel():
                raise FairPrunerError(
                    f"Layer '{mem.module}' lost input columns to another group before '{group.name}' was cut; "
                    f"add '{group.module}' to `ignore=`.")
            pos = mem.index.index_select(0, removed).flatten()
            cut_input_(reader, pos - torch.searchsorted(done, pos))
            cuts[mem.module] = (width, torch.cat([done, pos]).sort().values)


def _shares_inputs(graph: Any, modules: Dict[str, nn.Module], key: str) -> bool:
    """True when torch-pruning couples the reader's input columns to a Conv/Linear producer (a concatenation
    with another layer's output): that group cuts the same layer first, so these units are left alone."""
    reader = modules[key]
    node = graph.module2node.get(reader)
    if node is None:
        return False
    try:
        pruner = graph.get_pruner_of_module(reader)
        group = graph.get_pruning_group(reader, pruner.prune_in_channels, idxs=list(range(input_width(reader))))
    except Exception:  # noqa: BLE001 - a mapping torch-pruning cannot follow: stay safe
        return True
    return any(item.dep.target.module is not reader and isinstance(item.dep.target.module, WEIGHT_TYPES)
               and graph.is_out_channel_pruning_fn(item.dep.handler) for item in group)


def _coupled_output(graph: Any, modules: Dict[str, nn.Module], name: str, mod: nn.Module) -> bool:
    """True when the module's output is coupled to another producer's (a residual addition)."""
    if mod not in graph.module2node:
        return False
    try:
        group = graph.get_pruning_group(mod, graph.get_pruner_of_module(mod).prune_out_channels,
                                        idxs=list(range(mod.hidden_size * directions(mod))))
    except Exception:  # noqa: BLE001
        return True
    names = {m: n for n, m in modules.items()}
    return any(item.dep.target.module is not mod and item.dep.target.module in names
               and graph.is_out_channel_pruning_fn(item.dep.handler) for item in group)

