"""The datasets held in memory as whole-split tensors: digits, cifar10, cifar100, mnist, gaussian."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bionets.constants import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD
from bionets.data.bundle import DataBundle, Placement, make_mixup
from bionets.data.config import DataConfig
from bionets.data.gaussian import gaussian_classes, sample_gaussian
from bionets.data.sources import load_cifar, load_digits_split, load_mnist
from bionets.data.subset import training_subset
from bionets.data.tensor_loader import TensorLoader, random_crop
from bionets.errors import BionetsError


@dataclass
class Split:
    """A dataset in memory: images (uint8 in 0..255 or float in [0, 1], NCHW) and int64 targets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0          # random-crop padding of the standard augmentation (0: no augmentation)
    flip: bool = False


def load_digits(cfg: DataConfig, train: bool = True) -> Split:
    x, y, xt, yt, classes = load_digits_split()
    return Split(x, y, xt, yt, classes, (float(x.mean()),), (float(x.std()),), pad=1)


def load_cifar10(cfg: DataConfig, train: bool = True) -> Split:
    return Split(*load_cifar(cfg.root, cfg.download, 10, train), CIFAR_MEAN, CIFAR_STD, pad=4, flip=True)


def load_cifar100(cfg: DataConfig, train: bool = True) -> Split:
    return Split(*load_cifar(cfg.root, cfg.download, 100, train), CIFAR_MEAN, CIFAR_STD, pad=4, flip=True)


def load_mnist_split(cfg: DataConfig, train: bool = True) -> Split:
    return Split(*load_mnist(cfg.root, cfg.download, train), MNIST_MEAN, MNIST_STD, pad=1)


def load_gaussian(cfg: DataConfig, train: bool = True) -> Split:
    """``n_train`` and ``n_test`` samples of ``cfg.gaussian`` as ``dim`` channels of a 1x1 map; the
    samples, like the classes, depend on ``gaussian.seed`` only (not on the run seed)."""
    g = cfg.gaussian
    means, covs = gaussian_classes(g)
    gen = torch.Generator().manual_seed(g.seed + 1)
    x, y = sample_gaussian(means, covs, g.n_train, gen)
    xt, yt = sample_gaussian(means, covs, g.n_test, gen)
    return Split(x[:, :, None, None], y, xt[:, :, None, None], yt, [str(k) for k in range(g.num_classes)],
                 (0.0,) * g.dim, (1.0,) * g.dim)


def in_memory(load: Callable[[DataConfig, bool], Split]) -> Callable[[DataConfig, Placement], DataBundle]:
    """A dataset builder from a function that reads the whole dataset into a :class:`Split` (its
    second argument: whether the training split is wanted; it may be read all the same)."""

    def build(cfg: DataConfig, at: Placement) -> DataBundle:
        s = load(cfg, not at.test_only)
        x, y = s.x_train, s.y_train
        keep = training_subset(y, cfg.train_fraction, cfg.imbalance_ratio, at.seed) if not at.test_only else None
        if keep is not None:
            x, y = x[keep], y[keep]
        if len(y) < at.batch * at.world_size and not at.test_only:
            raise BionetsError(f"the training split of '{cfg.name}' has {len(y)} samples, fewer than one global "
                               f"batch of {at.batch * at.world_size}: lower data.batch_size")
        mean, std = (s.mean, s.std) if cfg.normalize else ((0.0,) * len(s.mean), (1.0,) * len(s.std))
        augment = random_crop(s.pad, s.flip) if cfg.augment and s.pad else None
        common = dict(mean=mean, std=std, rank=at.rank, world_size=at.world_size, seed=at.seed)
        train = None if at.test_only else TensorLoader(x, y, at.batch, train=True, augment=augment, **common)
        test = TensorLoader(s.x_test, s.y_test, at.eval_batch, train=False, **common)
        k = len(s.classes)
        return DataBundle(train, test, k, s.x_test.shape[1], s.x_test.shape[-1], make_mixup(cfg, k, at.label_smoothing),
                          s.classes, mean, std)

    return build
