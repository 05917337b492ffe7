"""Datasets: one registry, one ``build_data`` call, the same loaders for 1 or N processes.

``build_data(cfg, rank=, world_size=, seed=, label_smoothing=)`` returns a :class:`DataBundle` whose
``train`` and ``test`` are iterables of (float32 NCHW images, int64 targets) with ``len()`` and
``set_epoch()``. Small datasets (digits, cifar10, cifar100, mnist, gaussian) are held as tensors and
augmented per batch; ``imagefolder`` streams from disk through timm's transforms. A new dataset is
one entry in :data:`DATASETS`: a builder ``(DataConfig, Placement) -> DataBundle``, for example
``in_memory(load)`` around a function that reads the whole dataset into a :class:`Split`.
"""
from __future__ import annotations

from collections.abc import Callable

from bionets.data.bundle import DataBundle, Placement
from bionets.data.config import DataConfig, GaussianConfig
from bionets.data.gaussian import gaussian_classes, sample_gaussian
from bionets.data.imagefolder import build_imagefolder
from bionets.data.memory import (Split, in_memory, load_cifar10, load_cifar100, load_digits, load_gaussian,
                                 load_mnist_split)
from bionets.errors import unknown

DATASETS: dict[str, Callable[[DataConfig, Placement], DataBundle]] = {
    "digits": in_memory(load_digits),
    "cifar10": in_memory(load_cifar10),
    "cifar100": in_memory(load_cifar100),
    "mnist": in_memory(load_mnist_split),
    "gaussian": in_memory(load_gaussian),
    "imagefolder": build_imagefolder,
}


def build_data(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
               label_smoothing: float = 0.0, test_only: bool = False) -> DataBundle:
    """The train and test loaders of ``cfg`` for process ``rank`` of ``world_size``.

    ``seed`` (the run seed) sets the training order, the augmentation and the train_fraction /
    imbalance subsets; ``label_smoothing`` goes to mixup's soft targets. ``test_only``: the test
    loader alone (``train`` None), read without the training split where the dataset allows it
    (CIFAR, MNIST, image folders; the digits' normalization comes from their training split).
    """
    if cfg.name not in DATASETS:
        raise unknown("dataset", cfg.name, DATASETS)
    return DATASETS[cfg.name](cfg, Placement.of(cfg, rank, world_size, seed, label_smoothing, test_only))


__all__ = ["DATASETS", "DataBundle", "DataConfig", "GaussianConfig", "Placement", "Split", "build_data",
           "gaussian_classes", "in_memory", "sample_gaussian"]
