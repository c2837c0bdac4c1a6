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
from ..._core.inputs import logits_of
from ..._core.layers import CONV_TYPES, FROZEN_TYPES, WEIGHT_TYPES, replace_module
from ..._errors import FairPrunerError, UnsupportedModelError
from ..base import Family, USource, register
from .layers import (GATES, RNN_TYPES, RecurrentStack, cut_hidden_, cut_input_, directions, input_width,
                     join_layers, param_names, per_unit, run_layers, split_layers)

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


# ----------------------------------------------------------------------------------------------- NaN tagging

def _input_dim(mod: nn.Module) -> int:
    """The feature dimension of a reader's input: channels for Conv, the last one otherwise."""
    return 1 if isinstance(mod, CONV_TYPES) else -1


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _probe(model: nn.Module, name: str, mod: nn.RNNBase, x: tuple) -> Tuple[Dict[str, torch.Tensor], int]:
    """NaN tagging of ``mod``'s hidden units (see the module docstring).

    Returns:
        input position -> global unit index (-1: reads none) of every parametrised module that reads a unit
        (key "" for the model output), and the sequence length of ``mod``'s input.

    Raises:
        UnsupportedModelError: a position reads several units, or the module gets an initial state, a packed
            sequence, or runs more than once per forward.
    """
    n_layers, h, d = mod.num_layers, mod.hidden_size, directions(mod)
    n = n_layers * h
    bits = max(1, (n - 1).bit_length())
    ids = torch.arange(n)
    state = {"chosen": ids < 0, "calls": 0, "steps": 0}
    seen: Dict[str, torch.Tensor] = {}  # module -> (passes, positions) bool
    pass_no = [0]

    def check(m, args, kwargs):
        inp = args[0] if args else kwargs.get("input")
        if isinstance(inp, nn.utils.rnn.PackedSequence):
            raise UnsupportedModelError(f"Layer '{name}' is given a PackedSequence; packed sequences are not "
                                        "supported by the recurrent pruning. Pad the batch (same length) instead.")
        if (len(args) > 1 and args[1] is not None) or kwargs.get("hx") is not None:
            raise UnsupportedModelError(
                f"Layer '{name}' is given an initial state (h0/c0). Pruning removes hidden units, which equals "
                "zeroing them only from a zero initial state: call the layer without hx.")
        state["calls"] += 1
        state["steps"] = inp.shape[1 if mod.batch_first else 0]
        if state["calls"] > 1:
            raise UnsupportedModelError(f"Layer '{name}' runs more than once per forward pass; shared "
                                        "recurrent layers cannot be pruned. Add it to `ignore=`.")

    def tag(m, args, out):
        chosen = state["chosen"].view(n_layers, h)
        seq, st = out
        seq = seq.clone()
        last = chosen[-1].nonzero().flatten()
        seq[..., (torch.arange(d)[:, None] * h + last[None]).flatten().to(seq.device)] = float("nan")
        tagged = []
        for s in (st if isinstance(st, tuple) else (st,)):
            s = s.clone().view(n_layers, d, *s.shape[1:])
            s[chosen.to(s.device)[:, None, None, :].expand_as(s)] = float("nan")
            tagged.append(s.flatten(0, 1))
        return seq, (tuple(tagged) if isinstance(st, tuple) else tagged[0])

    def reader(key: str, dim: int):
        def record(a: Any) -> Any:
            if not (torch.is_tensor(a) and a.is_floating_point() and a.dim()):
                return a
            nan = torch.isnan(a)
            if not bool(nan.any()):
                return a
            width = a.shape[dim] if -a.dim() <= dim < a.dim() else 1
            if key not in seen:
                seen[key] = torch.zeros(2 * bits, width, dtype=torch.bool)
            if seen[key].shape[1] != width:  # several inputs of different widths: only "which units" counts
                seen[key] = seen[key].any(1, keepdim=True)
                width = 1
            hit = nan.movedim(dim, -1).reshape(-1, width).any(0) if width > 1 else nan.any().view(1)
            seen[key][pass_no[0]] |= hit.cpu()
            return torch.where(nan, torch.zeros_like(a), a)  # the unit is gone past the layers that read it

        def hook(m, args, kwargs):
            return tuple(record(a) for a in args), {k: record(v) for k, v in kwargs.items()}
        return hook

    handles = [mod.register_forward_pre_hook(check, with_kwargs=True), mod.register_forward_hook(tag)]
    for other_name, other in model.named_modules():
        if other is not mod and any(True for _ in other.parameters(recurse=False)):
            handles.append(other.register_forward_pre_hook(reader(other_name, _input_dim(other)),
                                                           with_kwargs=True))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _hooks(handles), torch.no_grad():
            for b in range(bits):
                for v in (0, 1):
                    pass_no[0] = 2 * b + v
                    state["chosen"], state["calls"] = ((ids >> b) & 1) == v, 0
                    out = logits_of(model(*x))
                    nan = torch.isnan(out)
                    if bool(nan.any()):
                        if "" not in seen:
                            seen[""] = torch.zeros(2 * bits, out.shape[-1], dtype=torch.bool)
                        seen[""][pass_no[0]] |= nan.reshape(-1, out.shape[-1]).any(0).cpu()
    finally:
        for m, t in flags.items():
            m.training = t
    decoded = {}
    for key, rec in seen.items():
        rec = rec.view(bits, 2, -1)
        zeros, ones = rec[:, 0], rec[:, 1]
        read = (zeros | ones).any(0)
        bad = read & ~(zeros ^ ones).all(0)
        if key == "" and bool(bad.any()):
            decoded[key] = ids  # units mixed into the model output: all of them reach it
            continue
        if bool(bad.any()):
            what = "the model output" if key == "" else f"layer '{key}'"
            raise UnsupportedModelError(
                f"The hidden units of '{name}' are mixed before {what} reads them (a normalisation, sum or "
                "attention over the hidden dimension); such units cannot be removed one by one. Add "
                f"'{name}' to `ignore=`.")
        unit = (ones.long() << torch.arange(bits)[:, None]).sum(0)
        decoded[key] = torch.where(read, unit, torch.full_like(unit, -1))
    return decoded, state["steps"]


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
        return _hooks(handles)

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
        decoded, steps = _probe(model, name, mod, x)
        if not steps:
            return []  # not called by the model
        n_layers, h, d = mod.num_layers, mod.hidden_size, directions(mod)
        gates = GATES[mod.mode]
        drop = set()
        readers: Dict[int, List[Member]] = {k: [] for k in range(n_layers)}
        for key, units in decoded.items():
            layers = {int(u) // h for u in units[units >= 0].unique()}
            reader = modules.get(key)
            if key == "" or isinstance(reader, FROZEN_TYPES):
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

