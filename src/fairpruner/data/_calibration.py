"""Calibration loaders: a balanced, seeded draw of a few samples per class, in class-interleaved batches."""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

__all__ = ["calibration_loader", "class_counts"]


def _labels_of(dataset: Dataset) -> list[int]:
    """All labels, from ``.targets`` when available (no decoding), otherwise by iterating once."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(v) for v in (targets.tolist() if hasattr(targets, "tolist") else targets)]
    if isinstance(dataset, Subset):
        parent = _labels_of(dataset.dataset)
        return [parent[int(i)] for i in dataset.indices]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def class_counts(dataset: Dataset) -> dict[int, int]:
    """Number of examples per label, ordered by label."""
    return dict(sorted(Counter(_labels_of(dataset)).items()))


def calibration_loader(dataset: Dataset, samples_per_class: int = 32, batch_size: int = 64, seed: int = 0,
                       num_classes: Optional[int] = None) -> DataLoader:
    """Deterministic class-balanced calibration subset.

    Draws ``samples_per_class`` examples of every class with a seeded generator (the global RNG is untouched)
    and orders them round-robin over the classes, so each batch mixes classes. A class with fewer examples
    contributes all of them (with a warning).

    Args:
        dataset: Labelled dataset; ``.targets`` is used when present.
        samples_per_class: Examples drawn per class.
        batch_size: Batch size of the loader.
        seed: Seed of the draw.
        num_classes: Expected number of classes (labels 0..num_classes-1); by default ``len(dataset.classes)``
            or the largest label plus one.

    Returns:
        Unshuffled DataLoader over the subset.

    Raises:
        ValueError: If there are fewer than two classes or a class has fewer than two examples.
    """
    if samples_per_class < 1 or batch_size < 1:
        raise ValueError("samples_per_class and batch_size must be positive")
    labels = torch.tensor(_labels_of(dataset), dtype=torch.long)
    if num_classes is None:
        classes = getattr(dataset, "classes", None)
        num_classes = len(classes) if classes is not None else int(labels.max()) + 1 if len(labels) else 0
    if num_classes < 2:
        raise ValueError(f"calibration needs at least 2 classes, the dataset has {num_classes}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}")
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    for c, m in enumerate(members):
        if len(m) < 2:
            raise ValueError(f"class {c} has {len(m)} example(s); calibration needs at least 2 per class")
    short = [c for c, m in enumerate(members) if len(m) < samples_per_class]
    if short:
        warnings.warn(f"classes {short} have fewer than {samples_per_class} examples; all of theirs are used")
    chosen = [m[torch.randperm(len(m), generator=generator)[:samples_per_class]].sort().values.tolist()
              for m in members]
    order = [idx[r] for r in range(max(map(len, chosen))) for idx in chosen if r < len(idx)]
    return DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False, collate_fn=_same_size_collate)


def _same_size_collate(batch: list) -> Any:
    """torch's default collate, with images of different sizes named as such (an ImageFolder resizes nothing)."""
    try:
        return default_collate(batch)
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" not in str(exc):
            raise
        sizes = sorted({tuple(x.shape) for x, _ in batch if torch.is_tensor(x)})
        raise ValueError(f"The images differ in size ({', '.join(map(str, sizes[:4]))}): give the dataset a "
                         "transform that resizes them, e.g. ImageFolder(root, transform=...).") from None
