"""The fixed CIFAR-10 validation split shared by ``train.py`` and ``accuracy.py``.

``accuracy.py`` chooses defaults on 5,000 training images (500 per class) and reports on the test set;
``train.py`` leaves those images out of training (``--holdout val``, its default) so that a checkpoint's
validation accuracy says how it generalises, not how well it remembers.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from fairpruner import data

PER_CLASS = 500
SEED = 12345  # the split is fixed, whatever the calibration seed


def validation_split(labels: Sequence[int], per_class: int = PER_CLASS, seed: int = SEED
                     ) -> Tuple[List[int], List[int]]:
    """Indices of a class-balanced validation split and of the rest, both sorted.

    Args:
        labels: One integer class label per training image.
        per_class: Validation images drawn from every class.
        seed: Seed of the draw.

    Returns:
        ``(validation, rest)``: disjoint sorted index lists covering ``range(len(labels))``.

    Example:
        >>> val, rest = validation_split([0, 1] * 600)
        >>> len(val), len(rest)
        (1000, 200)
    """
    labels_t = torch.as_tensor(list(labels))
    g = torch.Generator().manual_seed(seed)
    val: List[int] = []
    rest: List[int] = []
    for c in range(int(labels_t.max()) + 1 if len(labels_t) else 0):
        idx = torch.nonzero(labels_t == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val += idx[:per_class].tolist()
        rest += idx[per_class:].tolist()
    return sorted(val), sorted(rest)


def subset(dataset: data.ArrayDataset, indices: Sequence[int], augment: bool = False) -> data.ArrayDataset:
    """The images at ``indices`` as their own in-memory dataset (same normalisation and class names)."""
    idx = list(indices)
    return data.ArrayDataset(dataset.images.numpy()[idx], [dataset.targets[i] for i in idx], dataset.mean,
                             dataset.std, augment=augment, classes=dataset.classes)
