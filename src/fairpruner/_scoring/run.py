"""The scoring pass: U- and R-Scores of every prunable group from one forward+backward per batch.

Forward hooks project each measured tensor onto seeded random directions as it is produced (:mod:`.sites`);
one backward per batch accumulates gradients, from which every group's first-order Taylor terms follow at the
end (w is fixed, so summing ``dL_b/dw * w`` over batches equals ``(sum_b dL_b/dw) * w``). Distances are
computed for all units and class pairs at once (:mod:`.wasserstein`), then combined per group (:mod:`.reduce`).
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import families as _families
from .._core.groups import GroupSpec
from .._core.inputs import as_args, describe_inputs, device_of, length_of, logits_of, to_device
from .._core.layers import SUPPORTED_TYPES
from .._core.state import eval_mode, model_signature
from .._errors import DataError, FairPrunerError
from .._graph import build_graph, discover_groups, find_output_layers
from .._measure.costmodel import CostModel
from ..families.attention import AttentionOptions, for_attention_families
from .budget import StoreMeter, default_budget, parse_memory
from .distributed import agreed, distributed, merge_totals
from .passes import check_reiterable, fingerprint, later_pass, plan_store, reduce_pass, site_u
from .labels import check_classes, labelled_batch, next_kept, prescan_labels, refuse_empty
from .reduce import R_REDUCTIONS, U_CONSUMER_POWER, U_REDUCTIONS, assemble
from .scores import Scores
from .taylor import TaylorTerms
from .sites import U_SITES, Site, attach_sites, begin_forward, pick_sites, probe_batch_dims
from .wasserstein import PAIR_SEARCH, pair_rule, quantile_grid

__all__ = ["score", "U_SITES", "U_REDUCTIONS", "R_REDUCTIONS"]


def score(
    model: nn.Module,
    loader: Iterable,
    example_inputs: Any = None,
    *,
    samples_per_class: int = 32,
    projections: int = 128,
    seed: int = 0,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ignore: Sequence[str] = (),
    device: Optional[Any] = None,
    progress: Optional[bool] = None,
    u_at: str = "output",
    u_reduce: str = "mean",
    r_reduce: str = "max",
    u_consumer_power: float = U_CONSUMER_POWER,
    attention: str = "heads",
    family_options: Optional[Mapping[str, Any]] = None,
    max_memory: Union[int, str, None] = None,
    class_pairs: str = "auto",
) -> Scores:
    """Computes U- and R-Scores for every prunable group of ``model`` in one pass over ``loader``.

    The caller's model is left as it was: it is scored in place in eval mode (BatchNorm statistics frozen,
    dropout off) with gradients enabled on every parameter, and its modes, ``requires_grad`` flags and
    gradients are restored afterwards (on another ``device``, a copy is scored); so is the global RNG state.

    Args:
        model: a trained classifier.
        loader: iterable of ``(inputs, targets)`` batches with integer class labels (a DataLoader, or a list).
            U uses the first ``samples_per_class`` samples of each class in loader order; R uses every batch
            (``R_j = |sum_b dL_b/dw_j * w_j|`` with ``L_b`` the batch's loss, as the reference defines it).
        example_inputs: inputs used to trace the model; defaults to the first batch's inputs.
        samples_per_class: samples per class kept for the U-Score (the reference uses 32).
        projections: random directions for the sliced W1 of multi-dimensional unit outputs (reference: 128).
        seed: seeds the random directions; same seed, same scores.
        loss_fn: ``loss_fn(logits, targets)`` returning a batch-mean loss; cross-entropy by default.
        ignore: qualified names of extra layers whose output channels must not be pruned (the output layer
            is found and excluded automatically).
        device: where to run; defaults to the model's device.
        progress: show a progress bar; by default only when stderr is a terminal.
        u_at: where U is measured: "output" (default: the producing Conv/Linear's raw output, the paper's
            definition), "norm" (after the normalisation layer that follows) or "input" (the tensor the next
            layer consumes, after normalisation, activation and residual addition). Falls back to the next
            kind (output -> norm -> input; norm -> output; input -> norm -> output) where a group has
            none, or where the layer runs more than once per forward pass.
        u_reduce: how a group with several measured tensors combines them: "mean" (default) or "max" of the
            per-site U, each first divided by its mean so that differently scaled tensors weigh alike.
        r_reduce: how a group of coupled layers combines their R: "max" (default), the largest member |Taylor
            term|, or "sum", |sum of the Taylor terms of all members| (the first-order estimate of removing
            the coupled unit everywhere at once). Unit-family groups always sum (their members are parts of
            one unit). The defaults
            were chosen on a validation split of CIFAR-10 training images (see the README).
        u_consumer_power: each unit's U is multiplied by the L2 norm of the consumer weights that read it
            (every Conv/Linear input slice of the unit) to this power: a Linear or 1x1 conv reading the
            measured tensor passes the unit's class separation on scaled by exactly that norm (a proxy
            elsewhere), so U measures what the network receives from the unit.
            0 turns it off (the paper's U); unit families and groups read only by depthwise, grouped or
            recurrent layers keep their plain U.
        attention: the units of attention layers: "heads" (whole heads) or "head_dims" (one dimension of
            every head at once, so all heads keep the same width; the softmax scale stays the original).
            Shorthand for :class:`~fairpruner.families.AttentionOptions` of the attention families.
        family_options: unit-family name -> its options (a :class:`~fairpruner.families.FamilyOptions`),
            for families registered by you. Recorded in the scores, so plans made from them are applied with
            the same options.
        max_memory: bound on the U sample store, in bytes or as a string ("8GB", "512MiB"); default: a
            quarter of the memory available when scoring starts (on a GPU: of its free memory, and the store
            stays on the GPU). Three quarters of it hold samples, a quarter is the
            room in which U is computed. Where the store does not fit, the sites are cut into slices of units
            measured in further forward passes over the loader (no backward; the loader must give the same
            batches again), and maps smaller than ``projections`` are kept unprojected: U stays exact. A
            budget too small for one unit's samples is refused, naming the smallest that works.
        class_pairs: how the largest class-pair W1 is found: "all" pairs (exact), "search" (from the two
            classes of extreme mean, twice to the farthest class: a lower bound, linear in the number of
            classes), or "auto" (default): all pairs up to 32 classes, search above.

    Returns:
        :class:`Scores` with one entry per prunable group.

    Example:
        >>> scores = fp.score(model, fairpruner.data.calibration_loader(train, samples_per_class=32))
        >>> plan = fp.plan(scores, macs=0.5)
    """
    samples_per_class, projections, seed = (_integer(k, v) for k, v in (
        ("samples_per_class", samples_per_class), ("projections", projections), ("seed", seed)))
    fams = _check_options(model, samples_per_class, projections, u_at, u_reduce, r_reduce, u_consumer_power,
                          ignore, attention, family_options, class_pairs)
    device = device_of(model, device)
    budget = default_budget(device) if max_memory is None else parse_memory(max_memory)
    loss_fn = loss_fn or F.cross_entropy
    known, iterator, first = _open(loader)
    if example_inputs is None:
        example_inputs = labelled_batch(first)[0]

    show = progress if progress is not None else sys.stderr.isatty()
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(), \
            _working_model(model, device) as work:
        run = _prepare(work, example_inputs, device, fams, ignore, u_at, seed)
        taylor = TaylorTerms(run.groups, run.modules)
        taylor.configure(run.work, run.trace)
        run.state["grad_inputs"] = taylor.frozen
        hooks = attach_sites(run.sites, run.modules, run.state, projections) + taylor.attach(run.work)
        try:
            sizes = probe_batch_dims(run.work, run.trace, run.sites, run.state, projections)
            bound, padded, grid = _kept_bound(known, run.num_outputs, samples_per_class)
            store = agreed(lambda: plan_store(run.sites, sizes, run.modules, run.state, projections, bound, budget,
                                              hooks, (padded, grid)))
            # On a GPU the samples stay there (sorting and distances run there too); the budget is GPU memory.
            run.state["store_device"] = device if device.type == "cuda" else torch.device("cpu")
            check_reiterable(loader, store)
            seen, n_samples, order = agreed(lambda: _run_batches(run, taylor, _chain(first, iterator), loader,
                                                                 loss_fn, device, samples_per_class, show,
                                                                 len(store.passes)))
            if distributed():
                seen, n_samples = merge_totals(taylor, seen, n_samples)
            counts = check_classes(torch.arange(seen.numel()).repeat_interleave(seen), run.num_outputs)
            pairs = pair_rule(class_pairs, len(counts))
            reduce_pass(store, 0, samples_per_class, pairs, show)
            for k in range(1, len(store.passes)):
                agreed(lambda: later_pass(run.work, loader, store, k, order, samples_per_class, device, show))
                reduce_pass(store, k, samples_per_class, pairs, show)
        finally:
            for h in hooks:
                h.remove()
        site_us = [site_u(store, i) for i in range(len(run.sites))]
        result = assemble(run.groups, run.sites, site_us, run.modules, taylor, u_reduce, r_reduce,
                          u_consumer_power, run.outputs)
    meta = {
        "version": 1, "model_signature": model_signature(model), "samples_per_class": samples_per_class,
        "projections": projections, "seed": seed, "u_at": u_at, "u_reduce": u_reduce, "r_reduce": r_reduce,
        "u_consumer_power": u_consumer_power, "ignore": list(ignore), "family_options": _families.options_record(fams),
        "output_layers": run.outputs, "class_counts": {str(k): v for k, v in counts.items()},
        "n_samples": n_samples, "example_inputs": describe_inputs(example_inputs),
        "u_store": {"max_memory": budget, "passes": len(store.passes), "unprojected_sites": store.raw,
                    "peak_bytes": store.meter.peak, "class_pairs": pairs},
    }
    return Scores(result, run.cost, meta)


def _open(loader: Iterable) -> Tuple[Optional[torch.Tensor], Iterator, Any]:
    """The labels known before running the loader (checked), its iterator and its first batch. The RNG is
    forked: a DataLoader draws its seeds from the global RNG, which the caller gets back untouched."""
    with torch.random.fork_rng(devices=[]):
        known = prescan_labels(loader)
        if known is not None:
            check_classes(known, None)
        iterator = iter(loader)
        first = next(iterator, None)
    if first is None:
        refuse_empty()
    return known, iterator, first


def _integer(name: str, value: Any) -> int:
    """``value`` as a Python int (a numpy integer is one too); a clear error for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FairPrunerError(f"{name} must be an integer, got {value!r}.")
    return int(value)


def _check_options(model: nn.Module, samples_per_class: int, projections: int, u_at: str, u_reduce: str,
                   r_reduce: str, u_consumer_power: float, ignore: Sequence[str], attention: str,
                   family_options: Optional[Mapping[str, Any]], class_pairs: str) -> List[_families.Family]:
    """Refuses bad settings before any compute; returns the unit families, each with its options."""
    if not isinstance(samples_per_class, int) or samples_per_class < 2:
        raise FairPrunerError(f"samples_per_class must be an integer >= 2, got {samples_per_class!r}.")
    if not isinstance(projections, int) or projections < 1:
        raise FairPrunerError(f"projections must be a positive integer, got {projections!r}.")
    if isinstance(u_consumer_power, bool) or not isinstance(u_consumer_power, numbers.Real) or \
            not 0 <= u_consumer_power <= 4:
        raise FairPrunerError(f"u_consumer_power must be a number in [0, 4], got {u_consumer_power!r}.")
    for opt, val, allowed in (("u_at", u_at, U_SITES), ("u_reduce", u_reduce, U_REDUCTIONS),
                              ("r_reduce", r_reduce, R_REDUCTIONS), ("class_pairs", class_pairs, PAIR_SEARCH)):
        if val not in allowed:
            raise FairPrunerError(f"{opt}={val!r} is not one of {allowed}.")
    module_names = dict(model.named_modules())
    unknown = [n for n in ignore if n not in module_names]
    if unknown:
        raise FairPrunerError(f"ignore= names unknown modules {unknown}; use names from model.named_modules().")
    options = for_attention_families(AttentionOptions(units=attention))  # checks the value
    options.update(family_options or {})
    return _families.build(options)


@dataclass
class _Run:
    """What one scoring call works on: the model scoring runs on, its groups and measurement sites."""

    work: nn.Module
    trace: tuple
    groups: List[GroupSpec]
    cost: CostModel
    modules: Dict[str, nn.Module]
    sites: List[Site]
    outputs: List[str]
    num_outputs: int
    state: dict


@contextlib.contextmanager
def _working_model(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model the scoring pass runs on, in eval mode with every parameter trainable and without gradients
    (:meth:`TaylorTerms.configure` then freezes the weights whose R comes from activations).

    On the model's own device that is the caller's model itself, restored on exit (every submodule's train/eval
    flag, each parameter's ``requires_grad`` and ``.grad``): a copy would double the memory, which decides whether
    a large model can be scored at all (a 1 B-parameter Llama: 3.9 GB). On another device, a copy there.
    """
    copied = device_of(model) != device
    work = copy.deepcopy(model).to(device) if copied else model
    saved = [(p, p.requires_grad, p.grad) for p in work.parameters()]
    with eval_mode(work):
        try:
            for p, _, _ in saved:
                p.requires_grad_(True)
                p.grad = None
            yield work
        finally:
            if not copied:  # a copy is discarded; the caller's own model goes back as it was
                for p, trainable, grad in saved:
                    p.grad = grad
                    p.requires_grad_(trainable)


def _prepare(work: nn.Module, example_inputs: Any, device: torch.device, fams: List[_families.Family],
             ignore: Sequence[str], u_at: str, seed: int) -> _Run:
    """The groups, cost model and U sites of the model scoring runs on (see :func:`_working_model`)."""
    example_inputs = to_device(example_inputs, device)
    # Tracing needs shapes, not statistics: two samples keep its cost negligible.
    trace = tuple(t[:2] if torch.is_tensor(t) and t.dim() > 0 else t for t in as_args(example_inputs))
    graph = build_graph(work, trace, fams)
    outputs, num_outputs = find_output_layers(work, trace, fams)
    groups = discover_groups(graph, work, fams, ignore=tuple(ignore) + tuple(outputs), example_inputs=trace)
    del graph
    if not groups:
        raise FairPrunerError("No prunable groups were found (every layer is ignored or feeds the output)"
                              + _unknown_layers(work) + ".")
    cost = CostModel.build(work, trace, groups)
    modules = dict(work.named_modules())
    sites = pick_sites(groups, modules, u_at, seed, work, _called_twice(work, trace, groups))
    state: dict = {"keep": torch.empty(0, dtype=torch.long), "labels": None, "meter": StoreMeter(),
                   "forward": 0, "store_device": torch.device("cpu")}
    return _Run(work, trace, groups, cost, modules, sites, outputs, num_outputs, state)


def _called_twice(model: nn.Module, trace: tuple, groups: List[GroupSpec]) -> set:
    """Names of the groups' member modules that run more than once in one forward pass (a layer applied
    twice)."""
    members = {m.module for g in groups for m in g.members}
    calls: Dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in model.named_modules() if n in members]
    try:
        model(*trace)  # as the scoring passes run it (grad on: no fused paths that skip submodules)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, k in calls.items() if k > 1}


def _unknown_layers(model: nn.Module) -> str:
    """Names the kinds of weight-holding layers no group can be rooted at (e.g. transformers' Conv1D)."""
    kinds = sorted({type(m).__name__ for m in model.modules() if not isinstance(m, SUPPORTED_TYPES)
                    and any(p.dim() > 1 for p in m.parameters(recurse=False))})
    return (f"; its weights sit in layers of kinds fairpruner does not prune: {kinds}" if kinds else "")


def _run_batches(run: _Run, taylor: TaylorTerms, batches: Iterable, loader: Iterable, loss_fn: Callable,
                 device: torch.device, samples_per_class: int, show: bool, passes: int) -> tuple:
    """One forward+backward per batch; returns the samples seen per class and in all, and each batch's labels
    and a fingerprint of its inputs (later passes check that the loader gives the same batches again)."""
    seen = torch.zeros(0, dtype=torch.long)
    total = length_of(loader)
    n_samples = 0
    order, last = [], -1
    desc = "fairpruner: scoring" + (f" (pass 1/{passes})" if passes > 1 else "")
    taylor.running(True)
    try:
        for batch in tqdm(batches, total=total, desc=desc, disable=not show, leave=False):
            inputs, targets = labelled_batch(batch)
            keep, seen = next_kept(targets, seen, samples_per_class)
            order.append((targets, fingerprint(inputs) if passes > 1 else None))
            last = len(order) - 1 if keep.numel() else last
            begin_forward(run.state, keep.to(device), targets[keep])
            out = logits_of(run.work(*taylor.inputs(as_args(to_device(inputs, device)))))
            if int(targets.max()) >= out.shape[-1]:
                raise DataError(f"Label {int(targets.max())} is out of range for a model with {out.shape[-1]} "
                                "outputs; labels must be 0..K-1 for a K-class model.")
            loss = loss_fn(out, targets.to(device))
            if not bool(torch.isfinite(loss)):
                raise DataError("The loss is NaN/inf on a calibration batch; check the model and the labels.")
            # R sums dL_b/dw * w over batches b (the reference's definition): each member's per-channel terms
            # are taken as its gradient arrives (TaylorTerms).
            loss.backward()
            del out, loss  # the graph, with whatever its hooks hold, goes before the next forward
            n_samples += targets.numel()
    finally:
        taylor.running(False)
    return seen, n_samples, order[:last + 1]


def _kept_bound(known: Optional[torch.Tensor], num_outputs: int, samples_per_class: int) -> Tuple[int, int, int]:
    """Samples the U store will keep; as many as computing U lays out (every class padded to the largest); and
    the quantile grid of one unit (classes x grid points, where classes of unequal size meet): exact where the
    labels are known up front, else every output class full."""
    if known is not None and known.numel():
        kept = torch.bincount(known).clamp(max=samples_per_class)
        kept = kept[kept > 0]
        grid = kept.numel() * quantile_grid(kept.tolist())[1].numel()
        return int(kept.sum()), kept.numel() * int(kept.max()), grid
    full = max(2, num_outputs) * samples_per_class
    return full, full, full


def _chain(first: Any, rest: Iterable) -> Iterable:
    yield first
    yield from rest
