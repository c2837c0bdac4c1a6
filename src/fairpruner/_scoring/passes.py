"""The U store under a memory budget: sites cut into the slices each pass stores, the extra forward passes
that re-measure the kept samples, and U computed from each pass's slices as soon as the pass ends."""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core.inputs import as_args, to_device
from .._core.state import keeping_no_saved_tensors
from .._errors import DataError, FairPrunerError
from .budget import SiteSize, StoreMeter, format_bytes, plan_passes, trim_heap
from .distributed import distributed, share_u, to_owners
from .labels import labelled_batch, next_kept
from .sites import Site, StopForward, attach_sites, begin_forward
from .taps import grad_inputs
from .wasserstein import max_pairwise_w1

TRIM_ABOVE = 256 * 2 ** 20  # bytes of samples above which a single pass's heap is trimmed

__all__ = ["Store", "plan_store", "check_reiterable", "later_pass", "reduce_pass", "site_u"]


@dataclasses.dataclass
class Store:
    """Which sites store samples in which pass; U per original site, filled slice by slice."""

    passes: List[List[Site]]
    slices: Dict[int, List[Site]]  # original site position -> its slices, by first unit
    budget: int
    raw: int  # sites stored unprojected
    state: dict  # the hooks' shared state
    u: Dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # id(slice) -> U of its units

    @property
    def meter(self) -> StoreMeter:
        """What the hooks hold now and at most (kept in their shared state)."""
        return self.state["meter"]


def plan_store(sites: List[Site], sizes: List[Optional[SiteSize]], modules: Dict[str, nn.Module], state: dict,
               projections: int, samples: int, budget: int, hooks: list,
               layout: Optional[Tuple[int, int]] = None) -> Store:
    """Cuts the measured sites into passes within ``budget``; slices of a site get hooks of their own."""
    live = [i for i, s in enumerate(sizes) if s is not None]
    for i, s in enumerate(sites):
        s.active = sizes[i] is not None  # a tensor already measured by an earlier site of its group
    # Under torch.distributed every slice is gathered on one rank: 32 slices per rank bound what arrives at once.
    pieces = 32 * torch.distributed.get_world_size() if distributed() else 1
    plan, raw = plan_passes([sizes[i] for i in live], samples, projections, budget, pieces, layout)
    passes: List[List[Site]] = []
    slices: Dict[int, List[Site]] = {}
    for pass_slices in plan:
        members = []
        for k, lo, hi in pass_slices:
            i = live[k]
            parent = sites[i]
            if lo == 0 and hi == sizes[i].units and not raw[k]:
                piece = parent
            else:
                piece = _slice(parent, i, lo, hi, raw[k])
                parent.active = False
                hooks.extend(attach_sites([piece], modules, state, projections))
                piece.batch_dim, piece.channels_last = parent.batch_dim, parent.channels_last
                piece.identity = False
            members.append(piece)
            slices.setdefault(i, []).append(piece)
        passes.append(members)
    for members in passes[1:]:
        for s in members:
            s.active = False
    return Store(passes, slices, budget, sum(raw), state)


def _slice(parent: Site, position: int, lo: int, hi: int, raw: bool) -> Site:
    return dataclasses.replace(parent, index=parent.index[lo:hi].clone(), chunks=[], labels=[], calls=-1,
                               parent=position, lo=lo, raw=raw, directions=None, active=True)


def check_reiterable(loader: Iterable, store: Store) -> None:
    """Several passes need a loader that gives the same batches again: a list or a DataLoader in a fixed order,
    not a generator or a shuffling DataLoader (refused here, before the first pass)."""
    if len(store.passes) < 2:
        return
    need = f"max_memory={format_bytes(store.budget)} needs {len(store.passes)} passes over the calibration data"
    if iter(loader) is loader:
        raise FairPrunerError(f"{need}, but the loader is a one-shot iterator. Pass a list or a DataLoader, or "
                              "raise max_memory.")
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", getattr(loader, "sampler", None))
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise DataError(f"{need}, but the DataLoader shuffles. Use shuffle=False (the calibration samples are "
                        "drawn per class anyway), or raise max_memory.")


def fingerprint(inputs: object) -> torch.Tensor:
    """A cheap summary of a batch's inputs (the sum of each tensor), to tell a later pass's batch from the first
    pass's: random augmentation or a reshuffle within a class keeps the labels but not the values."""
    return torch.stack([t.detach().double().sum().cpu() for t in as_args(inputs) if torch.is_tensor(t)]
                       or [torch.zeros((), dtype=torch.float64)])


def later_pass(work: nn.Module, loader: Iterable, store: Store, number: int, order: List[torch.Tensor],
               samples_per_class: int, device: torch.device, progress: bool) -> None:
    """Forward passes over the batches that hold kept samples, storing this pass's slices. Gradients stay on
    (no backward runs): some layers take other kernels without them (LSTM on the CPU), and the samples must
    be the very values of the first pass. Autograd keeps none of the tensors it saves for a backward: the
    pass would otherwise hold a batch's activations beside its store."""
    state = store.state
    for s in store.passes[number]:
        s.active = True
    seen = torch.zeros(0, dtype=torch.long)
    last, got = len(order) - 1, -1  # the last batch holding kept samples; the last one read
    bar = tqdm(total=last + 1, desc=f"fairpruner: U pass {number + 1}/{len(store.passes)}", disable=not progress,
               leave=False)
    with torch.enable_grad():
        for b, batch in enumerate(loader):
            if b > last:
                break
            inputs, targets = labelled_batch(batch)
            got = b
            if not (torch.equal(targets, order[b][0]) and torch.equal(fingerprint(inputs), order[b][1])):
                _refuse_other_batches(store, "other samples (shuffled, or randomly augmented?)")
            keep, seen = next_kept(targets, seen, samples_per_class)
            bar.update(1)
            if keep.numel() == 0:
                continue
            begin_forward(state, keep.to(device), targets[keep])
            # No backward follows: the forward ends where the last of this pass's sites has recorded.
            state["waiting"] = len(store.passes[number])
            try:
                args = as_args(to_device(inputs, device))
                with keeping_no_saved_tensors():
                    # as the first pass ran it (some kernels differ with grad-requiring inputs)
                    work(*(grad_inputs(args) if state.get("grad_inputs") else args))
            except StopForward:
                pass
            finally:
                state["waiting"] = None
    bar.close()
    if got < last:
        _refuse_other_batches(store, f"{got + 1} batches where the first pass read {last + 1}")
    for s in store.passes[number]:
        s.active = False


def _refuse_other_batches(store: Store, what: str) -> None:
    raise DataError(f"max_memory={format_bytes(store.budget)} needs {len(store.passes)} passes over the calibration "
                    f"data, and the loader gave {what} the next time. Use a loader with a fixed order and no random "
                    "transforms (shuffle=False), or raise max_memory.")


def reduce_pass(store: Store, number: int, limit: int, pairs: str, progress: bool = False) -> None:
    """U of every slice stored in this pass, then its samples go. Under torch.distributed each slice's samples
    go to one owner rank, which computes its U; the U vectors are then shared, so every rank ends equal. The
    heap is trimmed before (the pass's activations are gone) and after (so are its samples) where that matters:
    between passes, or around a large store (a trim costs ~10 ms, a sixth of a small model's U)."""
    members = store.passes[number]
    n = len(store.passes)
    trim = n > 1 or store.meter.peak >= TRIM_ABOVE
    if trim:
        trim_heap()
    desc = "fairpruner: U" + (f" of pass {number + 1}/{n}" if n > 1 else "")
    for j, s in enumerate(tqdm(members, desc=desc, disable=not progress, leave=False)):
        s.active = False  # its samples are complete
        if distributed() and not to_owners(s, j, limit, store.meter):
            continue  # another rank owns it
        held = s.stored_bytes
        labels = torch.cat(s.labels) if s.labels else torch.zeros(0, dtype=torch.long)
        chunks, s.chunks, s.labels = s.chunks, [], []
        if labels.numel():
            store.u[id(s)] = max_pairwise_w1(chunks, labels, pairs=pairs,
                                             directions=s.directions if s.raw else None)
        store.meter.release(held)
    if trim:
        trim_heap()
    if distributed():
        share_u(members, store.u)


def site_u(store: Store, position: int) -> Optional[torch.Tensor]:
    """U of every unit of one original site, from its slices; None for a site measured by another."""
    pieces = store.slices.get(position)
    if not pieces:
        return None
    return torch.cat([store.u[id(p)] for p in sorted(pieces, key=lambda p: p.lo)])
