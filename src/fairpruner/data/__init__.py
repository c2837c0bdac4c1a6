"""Datasets and calibration loaders for fairpruner.

Image sources (CIFAR-10 archives, image-folder trees) are decoded once with Pillow into uint8 arrays cached as
``.npz`` files; that cache is the only thing this module writes to disk.
"""
from ._calibration import calibration_loader, class_counts
from ._images import (CIFAR10_MEAN, CIFAR10_STD, IMAGE_EXTENSIONS, ArrayDataset, ImageFolder, cifar10, digits,
                      load_dataset)

__all__ = ["ImageFolder", "ArrayDataset", "cifar10", "digits", "load_dataset", "calibration_loader", "class_counts",
           "CIFAR10_MEAN", "CIFAR10_STD", "IMAGE_EXTENSIONS"]
