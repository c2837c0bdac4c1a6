"""Tracing: torch-pruning's dependency graph of a model, built under a time bound with failures turned into clear
refusals, the checks on layers no surgery can cut exactly, and the layers whose outputs the model returns."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from .._core.inputs import as_args, logits_of, output_tensors, returned_tensors
from .._core.layers import FROZEN_TYPES, SUPPORTED_TYPES, UNSUPPORTED_HINTS, WEIGHT_TYPES, freezes
from .._core.state import keeping_no_saved_tensors, preserved_state
from .._errors import FairPrunerError, UnsupportedModelError

# The unit families handed in are ``fairpruner.families.Family`` instances. This module does not import that
# package: the families build on this adapter, not the other way round.
Families = Sequence[Any]

__all__ = ["build_graph", "find_output_layers", "family_layout", "torch_pruning_step", "Families", "GRAPH_SECONDS",
           "SECONDS_ENV"]

# torch-pruning explores the whole graph, which takes minutes or never ends on some models (a decoder's
# attention): a refusal after a bounded time is better than a hang.
GRAPH_SECONDS = 120.0
SECONDS_ENV = "FAIRPRUNER_GRAPH_SECONDS"


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def torch_pruning_step(what: str, model: nn.Module) -> Iterator[None]:
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
        with contextlib.ExitStack() as tracing, torch_pruning_step("Tracing the dependency graph", model), \
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


def find_output_layers(model: nn.Module, example_inputs: Any, families: Families = ()) -> Tuple[List[str], int]:
    """Names of the layers whose outputs the model returns (never pruned: every returned tensor keeps its shape),
    and the size of the logits' last dimension (the number of classes of a classifier).

    The logits' layer is the Conv/Linear whose output they are (or a view of it); otherwise the Conv/Linear layers
    they are computed from without passing through another one, found on their autograd graph (the last one
    called where it shows none). Any other tensor the model returns (an embedding beside the logits, an
    attention's weights) protects the layers it is computed from the same way, the modules a unit family claims
    (an ``nn.MultiheadAttention``) included."""
    outputs: Dict[str, torch.Tensor] = {}
    order: List[str] = []
    by_fn: Dict[Any, str] = {}  # autograd node of a layer's output -> the layer
    claimed: Dict[Any, str] = {}  # the same for the modules the families claim
    hooks = []
    for name, m in model.named_modules():
        weight = isinstance(m, WEIGHT_TYPES)
        if weight or any(f.claims(m) for f in families):
            def hook(mod, inp, out, name=name, weight=weight):
                if weight:
                    outputs[name] = out
                    order.append(name)
                (by_fn if weight else claimed).update(
                    (t.grad_fn, name) for t in output_tensors(out) if t.grad_fn is not None)
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = model(*(t.detach().requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t
                          for t in as_args(example_inputs)))
    finally:
        for h in hooks:
            h.remove()
    logits = logits_of(out)
    finals = returned_tensors(out)
    found = {name for name, t in outputs.items() for f in finals
             # Same tensor, or a view of it (flatten/reshape of a conv head).
             if t is f or (t.data_ptr() == f.data_ptr() and t.numel() == f.numel())}
    if not any(t is logits or t.data_ptr() == logits.data_ptr() for t in outputs.values()):
        # Through a claimed module's insides (a recurrent layer whose last layer's units are the logits: the
        # family keeps those), to the Conv/Linear layers behind them.
        found |= _layers_behind([logits], by_fn) or set(order[-1:])
    found |= _layers_behind([f for f in finals if f is not logits], {**by_fn, **claimed})
    return sorted(found), int(logits.shape[-1])


def _layers_behind(tensors: List[torch.Tensor], by_fn: Dict[Any, str]) -> set:
    """The layers (by name, from ``by_fn``: their outputs' autograd nodes) reached backwards from ``tensors`` before
    any other such layer: those whose channels reach the tensors."""
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
