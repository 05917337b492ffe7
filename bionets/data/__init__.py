"""Datasets: one registry, one ``build_data`` call, the same loaders for 1 or N processes.

``build_data(cfg, rank=, world_size=, seed=)`` returns a :class:`DataBundle` whose ``train`` and
``test`` are iterables of (float32 NCHW images, int64 targets) with ``len()`` and ``set_epoch()``.
Small datasets (digits, cifar10, cifar100, mnist, gaussian) are held as tensors and augmented per
batch; ``imagefolder`` streams from disk through timm's transforms.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bionets.data.config import DataConfig, GaussianConfig
from bionets.data.gaussian import gaussian_classes, sample_gaussian
from bionets.data.sources import (CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD, load_cifar, load_digits_split,
                                  load_mnist, require_root)
from bionets.data.subset import long_tailed, stratified_fraction
from bionets.data.tensor_loader import TensorLoader, random_crop
from bionets.errors import BionetsError, unknown


@dataclass
class DataBundle:
    train: object
    test: object
    num_classes: int
    in_chans: int
    img_size: int
    mixup: Callable | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Split:
    """A dataset held in memory: images (uint8 or float NCHW) and targets for train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0          # random-crop padding of the standard augmentation (0: none)
    flip: bool = False


def _digits(cfg: DataConfig, seed: int) -> Split:
    x, y, xt, yt, classes = load_digits_split()
    return Split(x, y, xt, yt, classes, (float(x.mean()),), (float(x.std()),), pad=1)


def _cifar(classes: int):
    def build(cfg: DataConfig, seed: int) -> Split:
        x, y, xt, yt, names = load_cifar(cfg.root, cfg.download, classes)
        return Split(x, y, xt, yt, names, CIFAR_MEAN, CIFAR_STD, pad=4, flip=True)
    return build


def _mnist(cfg: DataConfig, seed: int) -> Split:
    x, y, xt, yt, names = load_mnist(cfg.root, cfg.download)
    return Split(x, y, xt, yt, names, MNIST_MEAN, MNIST_STD, pad=2)


def _gaussian(cfg: DataConfig, seed: int) -> Split:
    g: GaussianConfig = cfg.gaussian
    means, covs = gaussian_classes(g)
    gen = torch.Generator().manual_seed(g.seed + 1)
    x, y = sample_gaussian(means, covs, g.n_train, gen)
    xt, yt = sample_gaussian(means, covs, g.n_test, gen)
    as_maps = lambda t: t[:, :, None, None]  # noqa: E731  (d features as d channels of a 1x1 map)
    return Split(as_maps(x), y, as_maps(xt), yt, [str(k) for k in range(g.num_classes)],
                 (0.0,) * g.dim, (1.0,) * g.dim)


DATASETS: dict[str, Callable[[DataConfig, int], Split]] = {
    "digits": _digits, "cifar10": _cifar(10), "cifar100": _cifar(100), "mnist": _mnist, "gaussian": _gaussian,
}
ALL_DATASETS = sorted(DATASETS) + ["imagefolder"]


def _mixup(cfg: DataConfig, num_classes: int, label_smoothing: float):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=label_smoothing,
                 num_classes=num_classes)


def _per_process(cfg: DataConfig, world_size: int) -> int:
    if cfg.batch_size % world_size:
        raise BionetsError(f"data.batch_size={cfg.batch_size} is the global batch and must divide evenly "
                           f"over {world_size} processes: use a multiple of {world_size}")
    return cfg.batch_size // world_size


def build_data(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
               label_smoothing: float = 0.0) -> DataBundle:
    """The train and test loaders of ``cfg`` for process ``rank`` of ``world_size``."""
    batch = _per_process(cfg, world_size)
    eval_batch = cfg.eval_batch_size or 2 * batch
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, batch, eval_batch, rank, world_size, seed, label_smoothing)
    if cfg.name not in DATASETS:
        raise unknown("dataset", cfg.name, ALL_DATASETS)
    s = DATASETS[cfg.name](cfg, seed)
    keep = torch.arange(len(s.y_train))
    if cfg.imbalance_ratio > 1:
        keep = long_tailed(s.y_train, cfg.imbalance_ratio, seed)
    if cfg.train_fraction < 1:
        keep = keep[stratified_fraction(s.y_train[keep], cfg.train_fraction, seed)]
    x, y = s.x_train[keep], s.y_train[keep]
    if len(y) < batch:
        raise BionetsError(f"the training split of '{cfg.name}' has {len(y)} samples, fewer than one batch of "
                           f"{batch} per process: lower data.batch_size")
    mean, std = (s.mean, s.std) if cfg.normalize else ((0.0,) * len(s.mean), (1.0,) * len(s.std))
    augment = random_crop(s.pad, s.flip) if cfg.augment and s.pad else None
    common = dict(mean=mean, std=std, rank=rank, world_size=world_size, seed=seed)
    train = TensorLoader(x, y, batch, train=True, augment=augment, **common)
    test = TensorLoader(s.x_test, s.y_test, eval_batch, train=False, **common)
    return DataBundle(train, test, len(s.classes), x.shape[1], x.shape[-1], _mixup(cfg, len(s.classes), label_smoothing),
                      s.classes, mean, std)


def _imagefolder(cfg, batch, eval_batch, rank, world_size, seed, label_smoothing) -> DataBundle:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from bionets.data.imagefolder import FolderLoader, image_folders

    train_set, val_set = image_folders(cfg, require_root(cfg.root, "imagefolder", False))
    if cfg.train_fraction < 1 or cfg.imbalance_ratio > 1:
        y = torch.tensor(train_set.targets)
        keep = long_tailed(y, cfg.imbalance_ratio, seed) if cfg.imbalance_ratio > 1 else torch.arange(len(y))
        if cfg.train_fraction < 1:
            keep = keep[stratified_fraction(y[keep], cfg.train_fraction, seed)]
        train_set.samples = [train_set.samples[i] for i in keep.tolist()]
        train_set.targets = [train_set.targets[i] for i in keep.tolist()]
    common = dict(workers=cfg.workers, rank=rank, world_size=world_size, seed=seed)
    n = len(train_set.classes)
    return DataBundle(FolderLoader(train_set, batch, train=True, **common), FolderLoader(val_set, eval_batch, train=False, **common),
                      n, 3, cfg.img_size or 224, _mixup(cfg, n, label_smoothing), list(train_set.classes),
                      tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))


__all__ = ["ALL_DATASETS", "DATASETS", "DataBundle", "Path", "build_data", "gaussian_classes", "sample_gaussian"]
