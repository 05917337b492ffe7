"""ImageNet-style folders (root/train/<class>/*, root/val/<class>/*) with timm's transforms.

Training images go through timm's ``create_transform(is_training=True)``: RandomResizedCrop to
``img_size``, horizontal flip, ``auto_augment`` (e.g. RandAugment 'rand-m9-mstd0.5'), random erasing
``reprob``; validation images are resized to ``img_size / crop_pct`` and center-cropped. Bicubic
interpolation and ImageNet's mean/std throughout.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from bionets.data.bundle import DataBundle, Placement, make_mixup
from bionets.data.config import DataConfig
from bionets.data.sources import require_root
from bionets.data.subset import training_subset
from bionets.errors import BionetsError


class FolderLoader:
    """A DataLoader over an ImageFolder split with ``set_epoch``.

    Training: a shuffling ``DistributedSampler`` (drop_last, as for the in-memory datasets).
    Validation: every image once, process ``rank`` taking ``indices[rank::world_size]`` (no padding).
    """

    def __init__(self, dataset: ImageFolder, batch_size: int, *, train: bool, workers: int, at: Placement):
        n = len(dataset)
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=at.world_size, rank=at.rank, shuffle=True,
                                              seed=at.seed, drop_last=True)
        else:
            self.sampler = range(at.rank, n, at.world_size)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=torch.cuda.is_available(), drop_last=train,
                                 persistent_workers=workers > 0)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def image_folders(cfg: DataConfig, root: Path) -> tuple[ImageFolder, ImageFolder]:
    """The train and val ImageFolders under ``root`` with timm's training / evaluation transforms."""
    size = cfg.img_size or 224
    splits = []
    for split, training in (("train", True), ("val", False)):
        folder = root / split
        if not folder.is_dir():
            raise BionetsError(f"imagefolder root '{root}' has no '{split}/' folder: expected "
                               f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        try:
            transform = create_transform(size, is_training=training, auto_augment=cfg.auto_augment if training else None,
                                         re_prob=cfg.reprob if training else 0.0, crop_pct=cfg.crop_pct,
                                         interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        except (AssertionError, KeyError, ValueError) as err:
            raise BionetsError(f"data.auto_augment='{cfg.auto_augment}' is not a timm augmentation string ({err}): "
                               "use e.g. 'rand-m9-mstd0.5', 'augmix-m5' or 'v0'") from None
        try:
            splits.append(ImageFolder(str(folder), transform=transform))
        except (FileNotFoundError, RuntimeError) as err:
            raise BionetsError(f"imagefolder '{folder}': {str(err).splitlines()[0]}") from None
    if splits[0].classes != splits[1].classes:
        raise BionetsError(f"imagefolder '{root}': train/ and val/ hold different class folders "
                           f"({len(splits[0].classes)} vs {len(splits[1].classes)})")
    return splits[0], splits[1]


def build_imagefolder(cfg: DataConfig, at: Placement) -> DataBundle:
    train_set, val_set = image_folders(cfg, require_root(cfg.root, "imagefolder", False))
    keep = training_subset(torch.tensor(train_set.targets), cfg.train_fraction, cfg.imbalance_ratio, at.seed)
    if keep is not None:
        train_set.samples = train_set.imgs = [train_set.samples[i] for i in keep.tolist()]
        train_set.targets = [s[1] for s in train_set.samples]
    if len(train_set) < at.batch * at.world_size:
        raise BionetsError(f"imagefolder '{cfg.root}' has {len(train_set)} training images, fewer than one global "
                           f"batch of {at.batch * at.world_size}: lower data.batch_size")
    k = len(train_set.classes)
    return DataBundle(FolderLoader(train_set, at.batch, train=True, workers=cfg.workers, at=at),
                      FolderLoader(val_set, at.eval_batch, train=False, workers=cfg.workers, at=at),
                      k, 3, cfg.img_size or 224, make_mixup(cfg, k, at.label_smoothing), list(train_set.classes),
                      tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
