"""Labels of the calibration data: checked before any compute, and the first samples of each class kept for U."""
from __future__ import annotations

from typing import Any, Dict, Iterable, NoReturn, Optional

import torch

from .._core.inputs import as_args, split_batch
from .._errors import DataError

__all__ = ["labelled_batch", "prescan_labels", "check_classes", "refuse_empty", "first_per_class", "next_kept"]


def labelled_batch(batch: Any) -> tuple:
    """``(inputs, targets)`` with targets checked to be 1-D non-negative integer class labels."""
    inputs, targets = split_batch(batch)
    if targets.dim() == 0:
        raise DataError("A batch's targets are a single label: the loader yields single samples (a Dataset?); "
                        "wrap it in a torch.utils.data.DataLoader, or use fairpruner.data.calibration_loader.")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() != 1:
        raise DataError(f"Targets must be a 1-D tensor of integer class labels; got {tuple(targets.shape)} "
                        f"{targets.dtype}. Convert one-hot or soft labels with .argmax(1).")
    if bool((targets < 0).any()):
        raise DataError("Class labels must be non-negative integers (found a negative label).")
    first = next((t for t in as_args(inputs) if torch.is_tensor(t) and t.dim() > 0), None)
    if first is not None and first.shape[0] != targets.shape[0]:
        # Per-sample MACs and U's samples are read along dim 0: a sequence-first (time, batch, ...) input
        # would be cut along time.
        raise DataError(f"A batch holds {targets.shape[0]} labels but its inputs have {first.shape[0]} rows "
                        f"(shape {tuple(first.shape)}): inputs must be batch-first, one row per label; transpose "
                        "a (time, batch, ...) input inside the model's forward.")
    return inputs, targets.long()


def prescan_labels(loader: Iterable) -> Optional[torch.Tensor]:
    """Labels known without running the loader, so class problems are reported before any compute."""
    if isinstance(loader, (list, tuple)):
        return torch.cat([labelled_batch(b)[1] for b in loader]) if loader else refuse_empty()
    ds = getattr(loader, "dataset", None)
    if ds is None or getattr(loader, "sampler", None) is not None and not isinstance(
            loader.sampler, (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler)):
        return None
    if getattr(loader, "drop_last", False) or getattr(ds, "target_transform", None) is not None:
        return None  # the dataset's raw targets are not the labels the loader yields
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[1].reshape(-1).long()
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return torch.as_tensor(targets).reshape(-1).long()
    return None


def refuse_empty() -> NoReturn:
    raise DataError("The loader is empty; give at least two classes of labelled samples.")


def check_classes(labels: torch.Tensor, num_outputs: Optional[int]) -> Dict[int, int]:
    if labels.numel() == 0:
        refuse_empty()
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


def first_per_class(targets: torch.Tensor, seen: torch.Tensor, limit: int) -> torch.Tensor:
    """Positions in the batch of the samples that are among the first ``limit`` of their class so far."""
    order = torch.argsort(targets, stable=True)
    sorted_t = targets[order]
    start = torch.searchsorted(sorted_t, sorted_t, right=False)
    rank = torch.empty_like(targets)
    rank[order] = seen[sorted_t] + torch.arange(targets.numel()) - start
    return (rank < limit).nonzero().flatten()



def next_kept(targets: torch.Tensor, seen: torch.Tensor, limit: int) -> tuple:
    """The batch positions kept for U (:func:`first_per_class`) and the samples seen per class after the batch."""
    if int(targets.max()) >= seen.numel():
        seen = torch.cat([seen, torch.zeros(int(targets.max()) + 1 - seen.numel(), dtype=torch.long)])
    keep = first_per_class(targets, seen, limit)
    return keep, seen + torch.bincount(targets, minlength=seen.numel())
