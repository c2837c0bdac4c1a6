"""The scoring pass: U- and R-Scores of every prunable group from one forward+backward per batch.

Forward hooks project each measured tensor onto seeded random directions as it is produced (so memory is
samples x units x projections, never full feature maps); one backward per batch accumulates gradients,
from which every group's first-order Taylor terms follow at the end (w is fixed, so summing
``dL_b/dw * w`` over batches equals ``(sum_b dL_b/dw) * w``). Distances are computed for all units and
class pairs at once by :mod:`fairpruner._wasserstein`.
"""
from __future__ import annotations

import copy
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._costmodel import CostModel
from ._tensors import as_args, first_sample, logits_of, to_device
from ._errors import DataError, FairPrunerError
from ._family import USource, family_of, family_options
from ._graph import GroupSpec, Member, build_graph, discover_groups, find_output_layers, model_signature
from ._scores import GroupScores, Scores
from ._wasserstein import max_pairwise_w1, random_directions

__all__ = ["score", "U_SITES", "U_REDUCTIONS", "R_REDUCTIONS"]

U_SITES = ("output", "norm", "input")
U_REDUCTIONS = ("max", "mean")
ATTENTION_UNITS = ("heads", "head_dims")
R_REDUCTIONS = ("sum", "max")


@dataclass
class _Site:
    """A tensor on which U is measured: a module's output or input, channels mapped to root channels."""

    group: int
    module: str
    side: str          # "output" | "input"
    index: torch.Tensor  # (channels,) position in the tensor's channel dimension of each root channel
    seed: int
    directions: Optional[torch.Tensor] = None
    identity: bool = False  # index is 0..n-1 over all of the tensor's channels
    channels_last: bool = False  # channels are the last dimension of 3-D tensors
    batch_dim: int = 0  # 1 for sequence-first tensors (nn.MultiheadAttention/RNN layers with batch_first=False)
    chunks: List[torch.Tensor] = field(default_factory=list)
    labels: List[torch.Tensor] = field(default_factory=list)
    calls: int = 0
    source: Optional[USource] = None  # a unit family's observation point (tensor arrives as (B, channels, ...))


def site_seed(seed: int, module: str, side: str) -> int:
    """Seed of the random directions for one measured tensor: stable across runs, models and group order."""
    return (seed * 1_000_003 + zlib.crc32(f"{module}:{side}".encode())) % (2 ** 63)


def _pick_sites(groups: List[GroupSpec], modules: Dict[str, nn.Module], u_at: str, seed: int,
                model: nn.Module) -> List[_Site]:
    sites = []
    for gi, g in enumerate(groups):
        if g.family is not None:
            for src in family_of(g.family).u_sources(model, g):
                sites.append(_Site(gi, src.name, "output", torch.arange(g.channels),
                                   site_seed(seed, src.name, "family"), identity=True, source=src))
            continue
        producers = [m for m in g.members if m.side == "out" and m.kind == "weight"]
        norms = [m for m in g.members if m.side == "out" and m.kind == "norm"]
        consumers = [m for m in g.members if m.side == "in" and m.kind == "weight" and m.index.shape[1] == 1
                     and not (isinstance(modules[m.module], nn.modules.conv._ConvNd) and modules[m.module].groups > 1)]
        chosen = {"output": [producers], "norm": [norms, producers], "input": [consumers, norms, producers]}[u_at]
        members: List[Member] = next((c for c in chosen if c), producers)
        for m in members:
            side = "input" if m.side == "in" else "output"
            sites.append(_Site(gi, m.module, side, m.index[:, 0].clone(), site_seed(seed, m.module, side)))
    return sites


def _channel_width(mod: nn.Module, side: str) -> int:
    """Channels of a module's output ("output") or input ("input"); -1 where the module does not say."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels if side == "output" else mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features if side == "output" else mod.in_features
    return int(getattr(mod, "num_features", getattr(mod, "num_channels", -1)))


def _split_batch(batch: Any) -> tuple:
    if isinstance(batch, dict):
        raise DataError("The loader yields dicts; it must yield (inputs, targets) pairs with integer class labels.")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError("The loader must yield (inputs, targets) pairs with integer class labels; got "
                        f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else ' of length ' + str(len(batch))}. "
                        "Scoring needs labels: wrap your data in a labelled Dataset (see fairpruner.data).")
    inputs, targets = batch
    if not torch.is_tensor(targets):
        targets = torch.as_tensor(targets)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() != 1:
        raise DataError(f"Targets must be a 1-D tensor of integer class labels; got {tuple(targets.shape)} "
                        f"{targets.dtype}. Convert one-hot or soft labels with .argmax(1).")
    if bool((targets < 0).any()):
        raise DataError("Class labels must be non-negative integers (found a negative label).")
    return inputs, targets.long()


def _prescan_labels(loader: Iterable) -> Optional[torch.Tensor]:
    """Labels known without running the loader, so class problems are reported before any compute."""
    if isinstance(loader, (list, tuple)):
        return torch.cat([_split_batch(b)[1] for b in loader])
    ds = getattr(loader, "dataset", None)
    if ds is None or getattr(loader, "sampler", None) is not None and not isinstance(
            loader.sampler, (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler)):
        return None
    if getattr(loader, "drop_last", False):
        return None
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[1].reshape(-1).long()
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return torch.as_tensor(targets).reshape(-1).long()
    return None


def _check_classes(labels: torch.Tensor, num_outputs: Optional[int]) -> Dict[int, int]:
    counts = torch.bincount(labels)
    present = {int(k): int(v) for k, v in enumerate(counts.tolist()) if v > 0}
    if len(present) < 2:
        raise DataError(f"The calibration data holds a single class ({list(present)}); U-Scores compare "
                        "classes, so give samples of at least two classes.")
    missing = [k for k, v in enumerate(counts.tolist()) if v == 0]
    if missing:
        raise DataError(f"Class(es) {missing[:10]} have no samples while higher labels do; give every class "
                        "at least 2 samples or relabel the classes 0..K-1.")
    few = {k: v for k, v in present.items() if v < 2}
    if few:
        raise DataError(f"Class(es) {sorted(few)} have fewer than 2 samples; each class needs at least 2 "
                        "(fairpruner.data.calibration_loader builds a balanced set).")
    if num_outputs is not None and max(present) >= num_outputs:
        raise DataError(f"Label {max(present)} is out of range for a model with {num_outputs} outputs.")
    return present


def _site_hook(site: _Site, state: dict, projections: int) -> Callable:
    def record(tensor: torch.Tensor) -> None:
        if state.get("probe") is not None:  # _probe_batch_dims: shapes only
            state["probe"][id(site)] = tuple(tensor.shape)
            return
        site.calls += 1
        if site.calls > 1:
            raise FairPrunerError(f"Module '{site.module}' runs more than once per forward pass; shared modules "
                                  "cannot be scored. Add it to `ignore=`.")
        keep = state["keep"]  # may be empty: an empty chunk still records the layout (for torch.distributed)
        # Several consumers of one group often read the very same tensor (a residual stream feeding a
        # block and its shortcut): measure it once.
        key = (site.group, tensor.data_ptr(), tuple(tensor.shape))
        if key in state["measured"]:
            return
        state["measured"][key] = tensor  # held until the batch ends, so the address cannot be reused
        with torch.no_grad():
            x = tensor.detach()
            if site.batch_dim:
                x = x.movedim(site.batch_dim, 0)
            if keep.numel() != x.shape[0]:  # copies only when some samples of the batch are not needed
                x = x.index_select(0, keep)
            if x.dim() > 2 and site.channels_last:  # (B, T, C) tokens, (B, H, W, C) channels-last maps
                x = x.movedim(-1, 1)
            if not site.identity:  # the group's channels are a slice/permutation of this tensor's channels
                x = x.index_select(1, site.index.to(x.device))
            x = x.float()
            if x.dim() == 2:
                # Scalar unit outputs: exact 1-D W1. A copy, since an in-place activation may follow.
                proj = x.unsqueeze(-1).clone()  # (b, units, 1)
            else:
                flat = x.flatten(2)
                if site.directions is None:
                    g = torch.Generator().manual_seed(site.seed)
                    site.directions = random_directions(flat.shape[-1], projections, g).to(flat.device)
                proj = flat @ site.directions  # (b, units, P)
            # NaN/inf anywhere in a kept sample survives the projection and its sum: one cheap reduction.
            if not bool(torch.isfinite(proj.sum())):
                raise DataError(f"Non-finite values (NaN/inf) in the {site.side} of '{site.module}'. Check the "
                                "model weights and the input normalisation.")
            site.chunks.append(proj.cpu())
            site.labels.append(state["labels"])
    if site.source is not None:
        return record
    if site.side == "output":
        return lambda mod, inp, out: record(out)
    return lambda mod, inp: record(inp[0])


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
    u_at: str = "input",
    u_reduce: str = "max",
    r_reduce: str = "sum",
    attention: str = "heads",
) -> Scores:
    """Computes U- and R-Scores for every prunable group of ``model`` in one pass over ``loader``.

    The caller's model is not modified: a copy is scored in eval mode (BatchNorm statistics frozen, dropout
    off) with gradients enabled on every parameter; the global RNG state is restored afterwards.

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
        u_at: where U is measured: "input" (default: the tensor the next layer consumes, after
            normalisation, activation and residual addition), "norm" (after the normalisation layer that
            follows) or "output" (the producing Conv/Linear's raw output, as the reference does). Falls back
            to the next available site (input -> norm -> output) where a group has none.
        u_reduce: how a group with several measured tensors combines them ("max" or "mean" of per-site U,
            each first divided by its mean so that differently scaled tensors weigh alike).
        r_reduce: "sum": |sum of the Taylor terms of all members| (the first-order estimate of removing the
            coupled unit everywhere at once); "max": the largest member |Taylor term|.
        attention: the units of attention layers: "heads" (whole heads) or "head_dims" (one dimension of
            every head at once, so all heads keep the same width; the softmax scale stays the original).
            Recorded in the scores, so that plans made from them are applied the same way.

    Returns:
        :class:`Scores` with one entry per prunable group.
    """
    if not isinstance(samples_per_class, int) or samples_per_class < 2:
        raise FairPrunerError(f"samples_per_class must be an integer >= 2, got {samples_per_class!r}.")
    if not isinstance(projections, int) or projections < 1:
        raise FairPrunerError(f"projections must be a positive integer, got {projections!r}.")
    for opt, val, allowed in (("u_at", u_at, U_SITES), ("u_reduce", u_reduce, U_REDUCTIONS),
                              ("attention", attention, ATTENTION_UNITS),
                              ("r_reduce", r_reduce, R_REDUCTIONS)):
        if val not in allowed:
            raise FairPrunerError(f"{opt}={val!r} is not one of {allowed}.")
    module_names = dict(model.named_modules())
    unknown = [n for n in ignore if n not in module_names]
    if unknown:
        raise FairPrunerError(f"ignore= names unknown modules {unknown}; use names from model.named_modules().")
    loss_fn = loss_fn or F.cross_entropy
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)

    known = _prescan_labels(loader)
    if known is not None:
        _check_classes(known, None)
    iterator = iter(loader)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("The loader is empty; give at least two classes of labelled samples.") from None
    first_inputs, _ = _split_batch(first)
    if example_inputs is None:
        example_inputs = first_inputs

    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        work = copy.deepcopy(model).to(device)
        work.eval()
        for p in work.parameters():
            p.requires_grad_(True)
            p.grad = None
        example_inputs = to_device(example_inputs, device)
        # Tracing needs shapes, not statistics: two samples keep its cost negligible.
        trace = tuple(t[:2] if torch.is_tensor(t) and t.dim() > 0 else t for t in as_args(example_inputs))
        graph = build_graph(work, trace)
        outputs, num_outputs = find_output_layers(work, trace)
        with family_options(attention=attention):
            groups = discover_groups(graph, work, ignore=tuple(ignore) + tuple(outputs), example_inputs=trace)
        del graph
        if not groups:
            raise FairPrunerError("No prunable groups were found (every layer is ignored or feeds the output).")
        cost = CostModel.build(work, trace, groups)
        modules = dict(work.named_modules())
        sites = _pick_sites(groups, modules, u_at, seed, work)
        state: dict = {"keep": torch.empty(0, dtype=torch.long), "labels": None, "measured": {}}
        hooks = []
        for s in sites:
            if s.source is not None:
                hooks.extend(s.source.attach(modules, _site_hook(s, state, projections)))
                continue
            mod = modules[s.module]
            width = _channel_width(mod, s.side)
            s.identity = width == s.index.numel() and torch.equal(s.index, torch.arange(width))
            if s.side == "output":
                hooks.append(mod.register_forward_hook(_site_hook(s, state, projections)))
            else:
                hooks.append(mod.register_forward_pre_hook(_site_hook(s, state, projections)))
            s.channels_last = isinstance(mod, nn.Linear)  # Linear layers on (B, T, C) sequences
        _probe_batch_dims(work, trace, sites, state)

        seen = torch.zeros(0, dtype=torch.long)
        total = len(loader) if hasattr(loader, "__len__") else None
        show = progress if progress is not None else sys.stderr.isatty()
        n_samples = 0
        try:
            batches = _chain(first, iterator)
            for batch in tqdm(batches, total=total, desc="fairpruner: scoring", disable=not show, leave=False):
                inputs, targets = _split_batch(batch)
                if int(targets.max()) >= seen.numel():
                    seen = torch.cat([seen, torch.zeros(int(targets.max()) + 1 - seen.numel(), dtype=torch.long)])
                keep = _first_per_class(targets, seen, samples_per_class)
                seen += torch.bincount(targets, minlength=seen.numel())
                state["keep"], state["labels"] = keep.to(device), targets[keep]
                for s in sites:
                    s.calls = 0
                state["measured"] = {}
                out = logits_of(work(*as_args(to_device(inputs, device))))
                if int(targets.max()) >= out.shape[-1]:
                    raise DataError(f"Label {int(targets.max())} is out of range for a model with {out.shape[-1]} "
                                    "outputs; labels must be 0..K-1 for a K-class model.")
                loss = loss_fn(out, targets.to(device))
                if not bool(torch.isfinite(loss)):
                    raise DataError("The loss is NaN/inf on a calibration batch; check the model and the labels.")
                # R sums dL_b/dw * w over batches b (the reference's definition): gradients accumulate.
                loss.backward()
                n_samples += targets.numel()
        finally:
            for h in hooks:
                h.remove()
        if _distributed():
            seen, n_samples = _merge_ranks(work, sites, seen, n_samples, samples_per_class)
        counts = _check_classes(torch.arange(seen.numel()).repeat_interleave(seen), num_outputs)
        result = _assemble(groups, sites, modules, n_samples, u_reduce, r_reduce)
    meta = {
        "version": 1, "model_signature": model_signature(model), "samples_per_class": samples_per_class, "projections": projections, "seed": seed,
        "u_at": u_at, "u_reduce": u_reduce, "r_reduce": r_reduce, "ignore": list(ignore),
        "family_options": {"attention": attention},
        "output_layers": outputs, "class_counts": {str(k): v for k, v in counts.items()},
        "n_samples": n_samples, "example_inputs": _describe_inputs(example_inputs),
    }
    return Scores(result, cost, meta)


def _probe_batch_dims(model: nn.Module, trace: tuple, sites: List[_Site], state: dict) -> None:
    """Finds the batch dimension of every measured tensor (sequence-first layers put it second): the one that
    changes between forward passes on one and on two samples. Run with grad enabled, as the scoring passes
    are (no fused inference paths, such as nested tensors in nn.TransformerEncoder)."""
    one = first_sample(trace)
    two = tuple(torch.cat([t, t]) if torch.is_tensor(t) and t.dim() > 0 else t for t in one)
    shapes = []
    try:
        for x in (one, two):
            state["probe"] = {}
            model(*x)
            shapes.append(state["probe"])
    finally:
        state["probe"] = None
    for s in sites:
        a, b = shapes[0].get(id(s)), shapes[1].get(id(s))
        if s.source is None and a is not None and b is not None and len(a) == len(b):
            s.batch_dim = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), 0)


def _first_per_class(targets: torch.Tensor, seen: torch.Tensor, limit: int) -> torch.Tensor:
    """Positions in the batch of the samples that are among the first ``limit`` of their class so far."""
    order = torch.argsort(targets, stable=True)
    sorted_t = targets[order]
    start = torch.searchsorted(sorted_t, sorted_t, right=False)
    rank = torch.empty_like(targets)
    rank[order] = seen[sorted_t] + torch.arange(targets.numel()) - start
    return (rank < limit).nonzero().flatten()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _merge_ranks(work: nn.Module, sites: List[_Site], seen: torch.Tensor, n_samples: int, limit: int):
    """Combines the shards of a torch.distributed run so that every rank holds the same totals.

    Gradients and sample counts are summed; each site's kept samples are gathered in rank order and cut
    to the first ``limit`` per class, so every rank computes identical scores.
    """
    dist = torch.distributed
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in work.parameters()]
    flat = torch.cat([g.flatten() for g in grads]).to(comm)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(work.parameters(), grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(p.device)
        offset += g.numel()
    width = torch.tensor([seen.numel()], device=comm)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    seen = torch.cat([seen, torch.zeros(int(width) - seen.numel(), dtype=torch.long)]).to(comm)
    dist.all_reduce(seen)
    total = torch.tensor([n_samples], device=comm)
    dist.all_reduce(total)
    for s in sites:
        data, labels = _all_gather_rows(torch.cat(s.chunks).to(comm), torch.cat(s.labels).to(comm))
        keep = _first_per_class(labels.cpu(), torch.zeros(int(width), dtype=torch.long), limit)
        s.chunks, s.labels = [data.cpu()[keep]], [labels.cpu()[keep]]
    return seen.cpu(), int(total)


def _all_gather_rows(data: torch.Tensor, labels: torch.Tensor) -> tuple:
    """all_gather of row blocks whose length differs between ranks (padded, then trimmed)."""
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([labels.numel()], device=labels.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(x) for x in sizes))
    shape = tuple(data.shape[1:]) if data.dim() > 1 else ()
    pad_d = torch.zeros((longest,) + shape, dtype=data.dtype, device=data.device)
    pad_d[:data.shape[0]] = data
    pad_l = torch.zeros(longest, dtype=labels.dtype, device=labels.device)
    pad_l[:labels.numel()] = labels
    all_d = [torch.zeros_like(pad_d) for _ in range(world)]
    all_l = [torch.zeros_like(pad_l) for _ in range(world)]
    dist.all_gather(all_d, pad_d)
    dist.all_gather(all_l, pad_l)
    return (torch.cat([d[:int(k)] for d, k in zip(all_d, sizes)]),
            torch.cat([l[:int(k)] for l, k in zip(all_l, sizes)]))


def _chain(first: Any, rest: Iterable) -> Iterable:
    yield first
    yield from rest


def _describe_inputs(example_inputs: Any) -> List[dict]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for t in as_args(example_inputs) if torch.is_tensor(t)]


def _unit_u(site: _Site) -> torch.Tensor:
    chunks, labels = site.chunks, torch.cat(site.labels)
    site.chunks, site.labels = [], []  # free the samples as soon as they are reduced
    return max_pairwise_w1(chunks, labels)


def member_params(member: Member, module: nn.Module) -> List[tuple]:
    """``(parameter, dim)`` pairs a member's index addresses (see :class:`Member`)."""
    own = dict(module.named_parameters(recurse=False))
    if member.params is not None:
        return [(own[n], d) for n, d in member.params if n in own]
    if member.side == "out":
        return [(p, 0) for p in own.values()]
    w = own.get("weight")
    return [(w, 1)] if w is not None and w.dim() > 1 else []


def _per_channel(t: torch.Tensor, dim: int, member: Member) -> torch.Tensor:
    """Sums ``t`` over every dimension but ``dim``, then over each root channel's positions in ``dim``."""
    if member.owner is not None:  # the whole tensor belongs to one root channel (an expert's layer)
        out = t.new_zeros(member.index.shape[0])
        out[member.owner] = t.sum()
        return out
    t = t.movedim(dim, 0).flatten(1).sum(1) if t.dim() > 1 else t
    return t.index_select(0, member.index.flatten().to(t.device)).view_as(member.index).sum(1)


def _taylor(member: Member, module: nn.Module) -> torch.Tensor:
    """Signed Taylor term per root channel of one member's output-side parameters."""
    total = 0.0
    for p, dim in member_params(member, module):
        if p.grad is not None:
            total = total + _per_channel(p.grad * p.detach(), dim, member)
    return total if torch.is_tensor(total) else torch.zeros(member.index.shape[0])


def _assemble(groups: List[GroupSpec], sites: List[_Site], modules: Dict[str, nn.Module], n_samples: int,
              u_reduce: str, r_reduce: str) -> List[GroupScores]:
    by_group: Dict[int, List[torch.Tensor]] = {}
    for s in sites:
        if s.chunks:  # a site that only saw tensors already measured by another site adds nothing
            by_group.setdefault(s.group, []).append(_unit_u(s))
    out = []
    for gi, g in enumerate(groups):
        us = torch.stack(by_group[gi])
        # Each measured tensor is brought to a common scale (its mean U) before combining, then the
        # combination is put back on the average W1 scale; a single site keeps its raw W1 values.
        scale = us.mean(1, keepdim=True).clamp_min(1e-12)
        us = us / scale
        u = (us.amax(0) if u_reduce == "max" else us.mean(0)) * scale.mean()
        terms = [_taylor(m, modules[m.module]).cpu().double()
                 for m in g.members if m.side == "out" and member_params(m, modules[m.module])]
        if not bool(torch.stack([t.isfinite().all() for t in terms]).all()):
            raise DataError(f"Non-finite gradients in group '{g.name}'; check the loss and the model.")
        t = torch.stack(terms)
        r = t.sum(0).abs() if r_reduce == "sum" else t.abs().amax(0)
        l1 = torch.zeros(g.channels, dtype=torch.float64)
        for m in g.members:
            if m.side == "out" and m.kind == "weight":
                for p, dim in member_params(m, modules[m.module]):
                    if p.dim() > 1:  # weights, not biases or norm scales
                        l1 += _per_channel(p.detach().abs(), dim, m).cpu().double()
        uc = g.unit_channels
        out.append(GroupScores(g.name, u.cpu().double()[uc].mean(1).float(), r[uc].sum(1).float(),
                               l1[uc].sum(1).float(), g.channels, uc.clone()))
    return out
