"""The torch-pruning adapter: builds its dependency graph and reads coupled groups out of it.

Groups (see :mod:`fairpruner._core.groups`) are rooted at Conv/Linear layers; the unit families handed in
(never looked up from here) add their own pruners, tracing hooks, parameter layouts and groups, as
torch-pruning itself takes ``customized_pruners``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from ._core.groups import GroupSpec, Member, dim_size, member_kind, member_params
from ._core.inputs import as_args, logits_of, output_tensors
from ._core.layers import (CONV_TYPES, FROZEN_TYPES, SUPPORTED_TYPES, UNSUPPORTED_HINTS, WEIGHT_TYPES,
                           freezes)
from ._core.state import keeping_no_saved_tensors, preserved_state
from ._errors import FairPrunerError, UnsupportedModelError

# The unit families handed in are ``fairpruner.families.Family`` instances. This module does not import that
# package: the families build on this adapter, not the other way round.
Families = Sequence[Any]

__all__ = ["build_graph", "discover_groups", "find_output_layers", "group_slots", "family_layout",
           "GRAPH_SECONDS", "SECONDS_ENV"]

# torch-pruning explores the whole graph, which takes minutes or never ends on some models (a decoder's
# attention): a refusal after a bounded time is better than a hang.
GRAPH_SECONDS = 120.0
SECONDS_ENV = "FAIRPRUNER_GRAPH_SECONDS"


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def _torch_pruning(what: str, model: nn.Module) -> Iterator[None]:
    """Runs a torch-pruning step under a time bound (main thread, where SIGALRM can be used) and turns its
    failures into a clear refusal: nothing from inside the dependency reaches the user as a crash."""
    seconds = float(os.environ.get(SECONDS_ENV, GRAPH_SECONDS))
    timed = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = None
    if timed:
        def alarm(signum, frame):
            raise _OutOfTime()
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _OutOfTime:
        raise UnsupportedModelError(
            f"{what} of {type(model).__name__} did not finish in {seconds:g} s: torch-pruning explores the "
            "whole graph, and this model's is beyond it. Prune a part of the model that has a plain structure, "
            f"or allow more time with the environment variable {SECONDS_ENV}=<seconds>.") from None
    except FairPrunerError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside the dependency becomes a refusal
        raise UnsupportedModelError(
            f"{what} of {type(model).__name__} failed inside torch-pruning ({type(e).__name__}: {e}). Add the "
            "layer involved to `ignore=`, or wrap the model so that it returns its logits alone.") from e
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class _InstanceNormPruner(tp.pruner.function.InstanceNormPruner):
    """torch-pruning's InstanceNorm pruner, which leaves the running statistics (``track_running_stats=True``)
    at their old size; they are cut with the channels here."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = torch.tensor(sorted(set(range(layer.num_features)) - set(int(i) for i in idxs)), dtype=torch.long)
        layer = super().prune_out_channels(layer, idxs)
        for name in ("running_mean", "running_var"):
            buf = getattr(layer, name, None)
            if torch.is_tensor(buf) and buf.shape[0] != layer.num_features:
                setattr(layer, name, buf.index_select(0, keep.to(buf.device)))
        return layer

    prune_in_channels = prune_out_channels


def family_layout(families: Families, module: nn.Module,
                  side: str) -> Optional[Tuple[Tuple[str, int], ...]]:
    """The first explicit parameter layout one of ``families`` gives ``module`` (see ``Family.layout``)."""
    for f in families:
        found = f.layout(module, side)
        if found is not None:
            return found
    return None


def _check_layers(model: nn.Module, families: Families) -> None:
    for name, module in model.named_modules():
        if any(f.claims(module) for f in families):
            continue
        for cls, what in UNSUPPORTED_HINTS.items():
            if isinstance(module, cls):
                raise UnsupportedModelError(
                    f"Layer '{name}' ({type(module).__name__}): {what} are not supported by this version's "
                    "channel surgery. Prune a model without it, or wrap the rest of the network and prune that.")
        own = [p for p in module.parameters(recurse=False)]
        # torch-pruning has no pruner for an unknown module type: its parameters reach the graph as "unwrapped"
        # parameters, which build_graph accepts only where they can never be pruned (a transformer's class token).
        if own and not isinstance(module, SUPPORTED_TYPES + FROZEN_TYPES) and not _unknown_to_tp(module):
            raise UnsupportedModelError(
                f"Layer '{name}' ({type(module).__name__}) holds its own parameters and is not a layer type "
                "fairpruner knows how to cut. Supported: Conv1d/2d/3d, Linear, BatchNorm, GroupNorm, "
                "InstanceNorm, PReLU. Rewrite it with standard layers.")


def _unknown_to_tp(module: nn.Module) -> bool:
    return tp.ops.module2type(module) == tp.ops.OPTYPE.ELEMENTWISE


def _on_frozen_stream(graph: tp.DependencyGraph, param: nn.Parameter) -> bool:
    """True if the channels of a parameter used directly in forward() are coupled to a LayerNorm or an
    embedding (or to nothing): discover_groups drops every such group, so the parameter is never cut."""
    if param not in graph.module2node:
        return True  # unused by the forward pass
    try:
        group = graph.get_pruning_group(param, graph.get_pruner_of_module(param).prune_out_channels,
                                        list(range(graph.get_out_channels(param))))
    except Exception:  # noqa: BLE001 - a coupling the library cannot follow is refused
        return False
    return any(freezes(item.dep.target.module) for item in group)


def _check_channel_padding(output: Any) -> None:
    """Refuses F.pad on the channel dimension (CIFAR 'option A' shortcuts): the graph would treat it as
    element-wise and the pruned model would break."""
    roots = [t.grad_fn for t in output_tensors(output) if t.grad_fn is not None]
    seen, stack = set(), roots
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith("ConstantPadNd"):
            pad = tuple(getattr(fn, "_saved_pad", ()))
            # Pads list dims from the last backwards; anything beyond the spatial dims reaches channels.
            if len(pad) > 4 and any(pad[4:]):
                raise UnsupportedModelError(
                    "The model pads tensors along the channel dimension (F.pad with pad=" f"{pad}), as "
                    "'option A' ResNet shortcuts do. Channel padding cannot be pruned consistently; use 1x1 "
                    "convolution shortcuts (option B) instead.")
        stack.extend(nxt for nxt, _ in fn.next_functions)


def build_graph(model: nn.Module, example_inputs: Any, families: Families = ()) -> tp.DependencyGraph:
    """Checks the model for unsupported parts and builds torch-pruning's dependency graph.

    Args:
        model: the model to trace; its train/eval flags and grad mode are restored afterwards.
        example_inputs: inputs it runs on.
        families: unit families whose pruners, tracing hooks and claimed layers take part.
    """
    _check_layers(model, families)
    with preserved_state(model):
        # Inputs that require grad make the autograd graph visible even when every parameter is frozen.
        traced = tuple(t.detach().requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t
                       for t in as_args(example_inputs))
        try:
            out = model(*traced)
        except Exception as e:  # noqa: BLE001 - rethrown with a hint
            raise UnsupportedModelError(
                f"The model does not run on the example inputs ({_describe(example_inputs)}): {e}. "
                "Pass `example_inputs=` shaped like one real batch.") from e
        _check_channel_padding(out)
        custom: Dict[type, Any] = dict.fromkeys(_INSTANCE_NORMS, _InstanceNormPruner())
        for fam in families:
            custom.update(fam.tp_pruners())
        # Parameters of modules torch-pruning has no pruner for are named (so that it does not warn that it
        # would prune them), and checked below.
        loose = [p for m in model.modules() if _unknown_to_tp(m)
                 and not isinstance(m, tuple(t for t in custom if isinstance(t, type)))
                 for p in m.parameters(recurse=False) if max(p.shape, default=1) > 1]
        # torch-pruning walks the traced graph and reads only sizes from it: keeping its saved tensors would
        # hold the original weights alive while pruning replaces them (3x the model at the peak).
        with contextlib.ExitStack() as tracing, _torch_pruning("Tracing the dependency graph", model), \
                keeping_no_saved_tensors():
            for fam in families:
                tracing.enter_context(fam.tracing(model))
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=traced, customized_pruners=custom or None, output_transform=output_tensors,
                unwrapped_parameters=[(p, max(i for i, s in enumerate(p.shape) if s > 1)) for p in loose] or None)
    # A family that claims a module cuts its parameters itself (they are members of the family's groups).
    claimed = {id(p) for m in model.modules() if any(f.claims(m) for f in families)
               for p in m.parameters(recurse=False)}
    # A norm's own scale (an RMSNorm outside torch's layer types) is never cut: the norm couples every channel.
    claimed |= {id(p) for m in model.modules() if freezes(m) for p in m.parameters(recurse=False)}
    unwrapped = [p for p, _ in graph.unwrapped_parameters
                 if id(p) not in claimed and not _on_frozen_stream(graph, p)]
    if unwrapped:
        names = [graph._param_to_name.get(p, "?") for p in unwrapped]
        owner = names[0].rpartition(".")[0]
        where = f" (in layer '{owner}', {type(model.get_submodule(owner)).__name__})" if owner else ""
        raise UnsupportedModelError(
            f"Parameters used directly in forward(), outside a standard layer: {names}{where}. They sit on "
            "channels that could be pruned, and their channel dimension cannot be inferred safely; move them into "
            "standard layers. (Such parameters are accepted on a stream that is never pruned, one coupled to a "
            "LayerNorm, as a transformer's class token and position embedding are.)")
    return graph


def _describe(example_inputs: Any) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
                     for t in as_args(example_inputs))


def find_output_layers(model: nn.Module, example_inputs: Any) -> Tuple[List[str], int]:
    """Names of the Conv/Linear layers whose outputs the model returns (never pruned: every returned tensor keeps
    its shape), and the size of the logits' last dimension (the number of classes of a classifier).

    The logits' layer is the one whose output they are (or a view of it; else the last layer called). Any other
    tensor the model returns (an embedding beside the logits) protects every layer it is computed from without
    passing through another one, found on its autograd graph."""
    outputs: Dict[str, torch.Tensor] = {}
    order: List[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_TYPES):
            def hook(mod, inp, out, name=name):
                outputs[name] = out
                order.append(name)
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = model(*(t.detach().requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t
                          for t in as_args(example_inputs)))
    finally:
        for h in hooks:
            h.remove()
    logits = logits_of(out)
    finals = [logits] if hasattr(out, "logits") else output_tensors(out)
    found = {name for name, t in outputs.items() for f in finals
             # Same tensor, or a view of it (flatten/reshape of a conv head).
             if t is f or (t.data_ptr() == f.data_ptr() and t.numel() == f.numel())}
    if not any(t is logits or t.data_ptr() == logits.data_ptr() for t in outputs.values()) and order:
        found.add(order[-1])
    found |= _layers_behind([f for f in finals if f is not logits], outputs)
    return sorted(found), int(logits.shape[-1])


def _layers_behind(tensors: List[torch.Tensor], outputs: Dict[str, torch.Tensor]) -> set:
    """The layers (by name, from ``outputs``) reached backwards from ``tensors``' autograd graph before any other
    such layer: those whose channels reach the tensors."""
    by_fn = {t.grad_fn: name for name, t in outputs.items() if torch.is_tensor(t) and t.grad_fn is not None}
    found, seen = set(), set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in by_fn:
            found.add(by_fn[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _partial_writer(root: nn.Module, merged: Dict[Tuple[str, str], Dict[int, set]],
                    modules: Dict[str, nn.Module]) -> bool:
    """True where another Conv/Linear layer writes only part of its outputs into the group's channels.
    torch-pruning maps a concatenation of a split's halves onto the wrong offsets (a branch's channels coupled
    to the first half of the split layer's outputs and of the concatenation); such a group is left whole. A
    split layer whose half is genuinely added to the root's output is left whole too, which is merely safe."""
    for (name, side), mapping in merged.items():
        m = modules[name]
        if side == "out" and m is not root and isinstance(m, WEIGHT_TYPES):
            width = m.out_channels if isinstance(m, CONV_TYPES) else m.out_features
            if len(set().union(*mapping.values())) != width:
                return True
    return False


def _depth_multiplier(m: nn.Module) -> bool:
    """A depthwise convolution with a channel multiplier (groups = in_channels < out_channels)."""
    return isinstance(m, CONV_TYPES) and 1 < m.groups == m.in_channels != m.out_channels


def _check_indices(name: str, members: List[Member], modules: Dict[str, nn.Module]) -> None:
    """Refuses a group whose channel mapping points past a member's parameters (an op between the layers that
    moves channels to other dimensions, such as PixelShuffle): its units could be neither scored nor cut."""
    for m in members:
        if m.side == "in" and isinstance(modules[m.module], CONV_TYPES) and modules[m.module].groups > 1:
            continue  # a grouped convolution's weight holds each group's inputs only: indexed per group
        for p, dim in member_params(m, modules[m.module]):
            if m.owner is None and m.index.numel() and int(m.index.max()) >= dim_size(p, dim):
                raise UnsupportedModelError(
                    f"Group '{name}': its channels map into '{m.module}' ({type(modules[m.module]).__name__}) past "
                    "its parameters, through an operation that moves channels elsewhere (e.g. PixelShuffle); add "
                    f"'{name}' to `ignore=`.")


def _unit_blocks(name: str, channels: int, members: List[Member], modules: Dict[str, nn.Module]) -> torch.Tensor:
    """Partition of root channels into units: whole GroupNorm groups where GroupNorm couples them; where a
    grouped convolution reads or writes them, one channel of every convolution group (the same position in each),
    so that every group keeps the same width."""
    label, kind = torch.arange(channels), None
    for mem in members:
        m = modules[mem.module]
        if isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
            lab, what = mem.index[:, 0] // (m.num_channels // m.num_groups), "groupnorm"
        elif isinstance(m, CONV_TYPES) and 1 < m.groups != m.in_channels:
            width = (m.out_channels if mem.side == "out" else m.in_channels) // m.groups
            lab, what = mem.index[:, 0] % width, "grouped"
        else:
            continue
        if kind is None:
            label, kind = lab, what
        elif not torch.equal(label, lab):
            raise UnsupportedModelError(
                f"Group '{name}' is coupled to GroupNorm layers or grouped convolutions with different channel "
                f"groupings (at '{mem.module}'); add one of them to `ignore=`.")
    order = torch.argsort(label * channels + torch.arange(channels))
    sizes = torch.bincount(label)
    sizes = sizes[sizes > 0]
    if not bool((sizes == sizes[0]).all()):
        raise UnsupportedModelError(f"Group '{name}': channel groups of unequal size cannot be pruned.")
    return order.view(-1, int(sizes[0]))


def group_slots(graph: tp.DependencyGraph, group: Any, name_of: Any) -> Dict[Tuple[str, str], Dict[int, set]]:
    """A torch-pruning group as ``{(module name, "out" | "in"): {root channel: positions}}``.

    ``name_of(module)`` gives a module's qualified name, or None for torch-pruning's placeholder nodes of
    functional ops, which are skipped.
    """
    merged: Dict[Tuple[str, str], Dict[int, set]] = {}
    for item in group:
        name = name_of(item.dep.target.module)
        if name is None:
            continue
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            side = "out"
        elif graph.is_in_channel_pruning_fn(item.dep.handler):
            side = "in"
        else:
            continue
        slot = merged.setdefault((name, side), {})
        for idx, ridx in zip(item.idxs, item.root_idxs):
            slot.setdefault(int(ridx), set()).add(int(idx))
    return merged


def discover_groups(graph: tp.DependencyGraph, model: nn.Module, families: Families = (),
                    ignore: Sequence[str] = (), example_inputs: Any = None) -> List[GroupSpec]:
    """All prunable groups: torch-pruning groups rooted at Conv/Linear layers not in ``ignore``, then the
    groups of the unit ``families`` (attention heads, recurrent units, experts).

    Groups whose channels would reach an ignored layer's output (the output layer, above all) are dropped
    by torch-pruning itself; groups that reach a LayerNorm or an embedding (a transformer's residual
    stream) are dropped here, since removing such a channel changes every other channel's result.
    """
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    owned = [n for fam in families for n in fam.owned(model)]
    ignored = [modules[n] for n in list(ignore) + owned]
    with _torch_pruning("Finding the coupled groups", model):
        found = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=list(WEIGHT_TYPES)))
    groups = []
    for group in found:
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        if channels is None or channels < 2:
            continue
        merged = group_slots(graph, group, names.get)
        if any(freezes(modules[mname]) for mname, _ in merged) or _partial_writer(root, merged, modules):
            continue
        members = []
        for (mname, side), mapping in merged.items():
            if sorted(mapping) != list(range(channels)):
                raise UnsupportedModelError(
                    f"Group '{names[root]}': layer '{mname}' is coupled to only part of the channels; "
                    f"add '{mname}' to `ignore=`.")
            width = {len(v) for v in mapping.values()}
            if len(width) != 1:
                raise UnsupportedModelError(f"Group '{names[root]}': irregular channel mapping into '{mname}'.")
            index = torch.tensor([sorted(mapping[c]) for c in range(channels)], dtype=torch.long)
            members.append(Member(mname, side, index, member_kind(modules[mname]),
                                  family_layout(families, modules[mname], side)))
        if any(_depth_multiplier(modules[m.module]) for m in members):
            continue  # each input channel feeds several outputs: no cut keeps the convolution's groups aligned
        _check_indices(names[root], members, modules)
        members.sort(key=lambda m: (m.side != "out", m.module))
        units = _unit_blocks(names[root], channels, members, modules)
        if units.shape[0] < 2:
            continue
        groups.append(GroupSpec(names[root], channels, units, members))
    for fam in families:
        groups.extend(fam.discover(model, graph, as_args(example_inputs) if example_inputs is not None else (),
                                   tuple(ignore)))
    return groups
