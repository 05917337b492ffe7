"""ImageNet-style folders (root/train/<class>/*, root/val/<class>/*) with timm's transforms."""
from __future__ import annotations

from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from bionets.data.config import DataConfig
from bionets.errors import BionetsError


class FolderLoader:
    """A DataLoader over an ImageFolder split with a DistributedSampler and ``set_epoch``."""

    def __init__(self, dataset: ImageFolder, batch_size: int, *, train: bool, workers: int, rank: int,
                 world_size: int, seed: int):
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                          seed=seed, drop_last=train)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=torch.cuda.is_available(), drop_last=train,
                                 persistent_workers=workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def image_folders(cfg: DataConfig, root: Path) -> tuple[ImageFolder, ImageFolder]:
    size = cfg.img_size or 224
    splits = []
    for split, training in (("train", True), ("val", False)):
        folder = root / split
        if not folder.is_dir():
            raise BionetsError(f"imagefolder root '{root}' has no '{split}/' folder: expected "
                               f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        transform = create_transform(size, is_training=training, auto_augment=cfg.auto_augment if training else None,
                                     re_prob=cfg.reprob if training else 0.0, crop_pct=cfg.crop_pct,
                                     interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        try:
            splits.append(ImageFolder(str(folder), transform=transform))
        except (FileNotFoundError, RuntimeError) as err:
            raise BionetsError(f"imagefolder '{folder}': {str(err).splitlines()[0]}") from None
    if splits[0].classes != splits[1].classes:
        raise BionetsError(f"imagefolder '{root}': train/ and val/ hold different class folders")
    return splits[0], splits[1]
