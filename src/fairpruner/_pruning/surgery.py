"""Applying a plan: physical channel removal (``prune``), zeroing (``mask``), and safe save/load.

torch-pruning does the surgery; this adapter guards its known hazards: indices are plain sorted unique ints,
groups are fetched with ``get_pruning_group`` (never the library's pruner classes or history), the output
layers are never roots, and train/eval flags, ``requires_grad`` and GroupNorm's group count are restored.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from .. import families as _families
from .._core.inputs import as_args, device_of, float_dtype, returned_tensors, synthetic_inputs, to_device
from .._core.layers import CONV_TYPES, WEIGHT_TYPES
from .._core.state import model_signature, preserved_state
from .._errors import PlanError, UnsupportedModelError
from .._graph import build_graph, family_layout
from .._measure.counting import count_macs
from .._planning.plans import Plan

__all__ = ["prune", "mask", "example_from_plan", "plan_families"]


def example_from_plan(plan: Plan) -> tuple:
    """Synthetic inputs with the recorded shapes and dtypes (seeded; the global RNG is not touched)."""
    if not plan.example_inputs:
        raise PlanError("The plan records no example input shape; pass `example_inputs=`.")
    return synthetic_inputs(plan.example_inputs)


def plan_families(plan: Plan) -> List[_families.Family]:
    """The unit families with the options the plan's scores were made with (e.g. attention="head_dims"), so
    that they find the same groups again."""
    return _families.build(plan.settings.get("scoring", {}).get("family_options", {}))


def _inputs_for(model: nn.Module, plan: Plan, example_inputs: Any) -> tuple:
    if example_inputs is not None:
        return to_device(as_args(example_inputs), device_of(model))
    # Synthetic inputs take the model's float dtype: a model scored in float32 and pruned as .double() or
    # .half() traces without the caller passing inputs.
    return to_device(example_from_plan(plan), device_of(model), float_dtype(model))


def _check_signature(plan: Plan, model: nn.Module) -> None:
    expected = plan.settings.get("model_signature")
    if expected and expected != model_signature(model):
        # A Hugging Face config copied from a pruned model builds a pruned model (transformers 4 replays it).
        hint = (" This model's config records pruned heads (config.pruned_heads): build it from the original "
                "config, not the pruned model's." if getattr(getattr(model, "config", None), "pruned_heads", None)
                else "")
        raise PlanError("The plan does not match this model: its layers or shapes differ from the scored model's "
                        "(another architecture, or a model that was already pruned). Apply a plan to a fresh, unpruned "
                        "instance of the architecture it was scored on." + hint)


def _plan_ignore(plan: Plan) -> List[str]:
    scoring = plan.settings.get("scoring", {})
    return list(scoring.get("ignore", [])) + list(scoring.get("output_layers", []))


def _family_specs(plan: Plan, work: nn.Module, graph, x: tuple, fams: List[_families.Family]) -> List[tuple]:
    """(family, group, removed channels) for the plan's groups that a unit family owns, checked against the model
    (also those that lose nothing, so that torch-pruning's side never looks them up)."""
    ignore = tuple(_plan_ignore(plan))
    found = {g.name: (fam, g) for fam in fams for g in fam.discover(work, graph, x, ignore)}
    out = []
    for spec in plan.groups:
        if spec["name"] not in found:
            continue
        fam, g = found[spec["name"]]
        chans = sorted(set(int(c) for c in spec["removed_channels"]))
        if g.channels != spec["channels"]:
            raise PlanError(f"The plan does not match this model: '{spec['name']}' has {g.channels} units of its "
                            f"kind, the plan expects {spec['channels']}. Was the model already pruned?")
        if chans and (chans[0] < 0 or chans[-1] >= g.channels or len(chans) >= g.channels):
            raise PlanError(f"Plan for '{spec['name']}' removes invalid units (must be 0..{g.channels - 1}, not all).")
        out.append((fam, g, chans))
    return out


def _groups_to_apply(plan: Plan, graph, modules: Dict[str, nn.Module], skip: Sequence[str] = ()):
    """Yields (spec, torch-pruning group) for every group that loses channels, after checking the match."""
    for spec in plan.groups:
        if spec["name"] in skip:
            continue
        chans = sorted(set(int(c) for c in spec["removed_channels"]))
        root = modules.get(spec["name"])
        if root is None:
            raise PlanError(f"The plan does not match this model: it has no layer '{spec['name']}'. Apply a plan "
                            "to the architecture it was made for (an unpruned instance).")
        n = graph.get_out_channels(root)
        if n != spec["channels"]:
            raise PlanError(f"The plan does not match this model: '{spec['name']}' has {n} output channels, the "
                            f"plan expects {spec['channels']}. Was the model already pruned?")
        if chans and (chans[0] < 0 or chans[-1] >= n or len(chans) >= n):
            raise PlanError(f"Plan for '{spec['name']}' removes invalid channels (must be 0..{n - 1}, not all).")
        if chans:
            pruner = graph.get_pruner_of_module(root)
            yield spec, graph.get_pruning_group(root, pruner.prune_out_channels, idxs=chans)


def prune(model: nn.Module, plan: Plan, example_inputs: Any = None, *, verify: bool = True) -> nn.Module:
    """Returns a physically smaller copy of ``model`` with the plan's units removed.

    Args:
        model: the unpruned model the plan was made for; it is not modified.
        plan: from :func:`fairpruner.plan` (or :meth:`Plan.from_json`).
        example_inputs: inputs to trace with; defaults to random inputs of the shape recorded in the plan.
        verify: check that the pruned model's outputs equal the original with the same units zeroed.

    Returns:
        The pruned copy, in the mode ``model`` was in, with the caller's ``requires_grad`` choices.

    Raises:
        PlanError: if the plan was made for another architecture or an already pruned model.

    Example:
        >>> pruned = fp.prune(model, fp.plan(scores, macs=0.5))
        >>> fp.count_macs(pruned, x) / fp.count_macs(model, x)  # about 0.5
    """
    _check_signature(plan, model)
    work = copy.deepcopy(model)
    x = _inputs_for(work, plan, example_inputs)
    flags = {n: p.requires_grad for n, p in work.named_parameters()}
    tied = _tied_names(work)
    gn_sizes = {n: m.num_channels // m.num_groups for n, m in work.named_modules() if isinstance(m, nn.GroupNorm)}
    fams = plan_families(plan)
    with torch.random.fork_rng(devices=[]), preserved_state(work):
        graph = build_graph(work, x, fams)
        modules = dict(work.named_modules())
        custom = _family_specs(plan, work, graph, x, fams)
        release = _Releaser(work)
        # Fetch each group right before pruning it: concatenation offsets shift after every prune.
        for _, group in _groups_to_apply(plan, graph, modules, skip=[g.name for _, g, _ in custom]):
            group.prune()
            release()
        # Unit families cut their own modules (heads, gate blocks, experts), after torch-pruning's groups.
        for fam, g, chans in custom:
            if chans:
                fam.prune_(work, g, chans)
                release()
        for fam in {id(f): f for f, _, chans in custom if chans}.values():
            fam.finish_(work)
    del graph, custom, release
    _check_still_tied(work, tied)
    for name, m in work.named_modules():
        if name in gn_sizes and m.num_channels % gn_sizes[name] == 0:
            m.num_groups = m.num_channels // gn_sizes[name]
    # Pruning re-creates parameters; bring back the caller's frozen/trainable choice.
    for n, p in work.named_parameters():
        p.requires_grad_(flags.get(n, True))
    if verify:
        _verify(model, work, plan, x)
        if example_inputs is None:  # the plan's own input shapes: its prediction must hold
            _check_predicted_macs(work, plan, x)
    # Every round's plan travels with the model, so save/load can rebuild a model pruned several times.
    work._fairpruner_history = list(getattr(model, "_fairpruner_history", [])) + [plan.to_json()]
    return work


def _tied_names(model: nn.Module) -> List[List[str]]:
    """Names of each parameter that several modules share (tied weights)."""
    names: Dict[int, List[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return [ns for ns in names.values() if len(ns) > 1]


def _check_still_tied(work: nn.Module, tied: List[List[str]]) -> None:
    """Refuses a plan that cut tied weights apart: the copies would diverge and the model grow."""
    params = dict(work.named_parameters(remove_duplicate=False))
    for names in tied:
        if len({id(params[n]) for n in names if n in params}) > 1:
            raise UnsupportedModelError(
                f"The plan prunes {' and '.join(names)}, one shared (tied) parameter, differently, which would "
                f"untie them. Keep their layers whole with fp.score(..., ignore=[...]) naming them, or untie them "
                "in the model first.")


class _Releaser:
    """Frees the storage of every parameter the surgery has replaced. The traced graph's nodes hold the old
    parameter objects until it is collected, so without this a large model's peak is the original, its copy
    and the pruned copy at once; the tracing kept no other use of their values (``keeping_no_saved_tensors``)."""

    def __init__(self, work: nn.Module) -> None:
        self.work = work
        self.old = {id(p): p for p in work.parameters()}

    def __call__(self) -> None:
        live = {id(p) for p in self.work.parameters()}
        for key in [k for k in self.old if k not in live]:
            old = self.old.pop(key)
            old.data = torch.empty(0, dtype=old.dtype, device=old.device)


def _zero_(module: nn.Module, side: str, idxs: List[int], fams: List[_families.Family]) -> None:
    index = torch.tensor(idxs, dtype=torch.long)
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        return  # one slope shared by every channel: it stays, as in the pruned model
    layout = family_layout(fams, module, side)  # a family-claimed layer (an LSTM's input columns)
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if layout is not None:
                for dim in (d for n, d in layout if n == name):
                    p.index_fill_(dim, index.to(p.device), 0.0)
                continue
            if side == "out":
                p.index_fill_(0, index.to(p.device), 0.0)
            elif name == "weight" and isinstance(module, WEIGHT_TYPES) and p.dim() > 1:
                if isinstance(module, CONV_TYPES) and module.groups > 1:
                    continue  # depthwise: its input channels are its output channels, zeroed above
                p.index_fill_(1, index.to(p.device), 0.0)


def mask(model: nn.Module, plan: Plan, example_inputs: Any = None) -> nn.Module:
    """Returns a copy of ``model`` of the same shape with the plan's units zeroed.

    Every parameter slice that :func:`prune` would remove is set to zero (producer rows and biases,
    normalisation scales and shifts, consumer columns), so the outputs equal the pruned model's.

    Args:
        model: the unpruned model the plan was made for; it is not modified.
        plan: from :func:`fairpruner.plan`.
        example_inputs: inputs to trace with; defaults to random inputs of the shape recorded in the plan.

    Returns:
        A same-shape copy of ``model`` with the removed units zeroed.

    Example:
        >>> masked = fp.mask(model, plan)
        >>> torch.testing.assert_close(masked(x), fp.prune(model, plan)(x))
    """
    _check_signature(plan, model)
    work = copy.deepcopy(model)
    x = _inputs_for(work, plan, example_inputs)
    fams = plan_families(plan)
    with torch.random.fork_rng(devices=[]), preserved_state(work):
        graph = build_graph(work, x, fams)
        modules = dict(work.named_modules())
        names = {m: n for n, m in modules.items()}
        custom = _family_specs(plan, work, graph, x, fams)
        for fam, g, chans in custom:
            if chans:
                fam.mask_(work, g, chans)
        for _, group in list(_groups_to_apply(plan, graph, modules, skip=[g.name for _, g, _ in custom])):
            for item in group:
                target = item.dep.target.module
                if target not in names:
                    continue
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    _zero_(target, "out", sorted(set(int(i) for i in item.idxs)), fams)
                elif graph.is_in_channel_pruning_fn(item.dep.handler):
                    _zero_(target, "in", sorted(set(int(i) for i in item.idxs)), fams)
    return work


# Relative tolerance of the pruned-vs-masked check per float dtype: rounding differs between the two
# computations (another summation order), by about the dtype's epsilon times the depth; a coupling the surgery
# got wrong moves the outputs by far more.
_VERIFY_RTOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _check_predicted_macs(pruned: nn.Module, plan: Plan, x: tuple) -> None:
    """Says aloud where the pruned model's MACs per sample differ from the plan's prediction by more than 1 %:
    MACs the cost model did not tie to the units (attention written with torch.matmul on pruned projections),
    so that a MACs target was not met as planned."""
    want, before = plan.predicted.get("macs_after"), plan.predicted.get("macs_before")
    if not want or not before:
        return
    with torch.random.fork_rng(devices=[]), preserved_state(pruned):
        got = count_macs(pruned, x)
    if abs(got - want) > 0.01 * want:
        warnings.warn(f"The pruned model runs {got:,} MACs per sample where the plan predicted {int(want):,}: it "
                      f"removes {1 - got / before:.1%} of the MACs, not {1 - want / before:.1%}. The model computes "
                      "MACs the plan could not tie to the units (e.g. attention written with torch.matmul); plan "
                      "again with a target that allows for it.", stacklevel=3)


def _verify(original: nn.Module, pruned: nn.Module, plan: Plan, x: tuple) -> None:
    """Every tensor the pruned model returns equals the masked model's (shape and values, to the dtype's
    tolerance); a pruned model that does not run is refused as clearly."""
    fix = "the model holds a coupling the surgery cannot follow. Add the affected layers to `ignore=`."
    masked = mask(original, plan, x)
    with torch.random.fork_rng(devices=[]), preserved_state(pruned), preserved_state(masked), torch.no_grad():
        try:
            outs = returned_tensors(pruned(*x))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure of the cut model is the surgery's refusal
            raise UnsupportedModelError(f"The pruned model does not run ({type(e).__name__}: {e}); {fix}") from e
        wants = returned_tensors(masked(*x))
    # A mixed-precision model is checked to its least precise dtype.
    rtol = max((_VERIFY_RTOL.get(p.dtype, 1e-4) for p in original.parameters() if p.is_floating_point()),
               default=1e-4)
    if [tuple(t.shape) for t in outs] != [tuple(t.shape) for t in wants]:
        raise UnsupportedModelError(f"Pruning changed the output shapes {[tuple(t.shape) for t in wants]} -> "
                                    f"{[tuple(t.shape) for t in outs]}; {fix}")
    for a, b in zip(outs, wants):
        if not a.is_floating_point():
            continue
        # float32 at least (float64 where it is): not every device has float64, and logits can be large.
        a, b = (a, b) if a.dtype == torch.float64 else (a.float(), b.float())
        err = (a - b).abs_().amax().item() / max(b.abs().amax().item(), 1e-12) if a.numel() else 0.0
        if not err <= rtol:  # NaN fails too
            raise UnsupportedModelError(f"The pruned model differs from the masked model (relative error "
                                        f"{err:.2e}); {fix}")
