"""ImageNet-style folders (root/train/<class>/*, root/val/<class>/*) with timm's transforms.

Training images go through timm's ``create_transform(is_training=True)``: RandomResizedCrop to
``img_size``, horizontal flip, ``auto_augment`` (e.g. RandAugment 'rand-m9-mstd0.5') or else a
ColorJitter of ``color_jitter`` (timm's 0.4; 0 for none), random erasing ``reprob`` filled per
``remode`` (timm's train.py default 'pixel': per-pixel normal noise, as the DeiT and ConvNeXt
recipes use); with
``augment=false`` they are resized and center-cropped as validation images are (to ``img_size /
crop_pct``, then ``img_size``). Bicubic interpolation, or ``interpolation`` (bilinear; 'random',
timm train.py's default for training crops: bilinear or bicubic at random, validation bicubic);
ImageNet's mean/std, or none with
``normalize=false``. An unreadable image is one error line naming its file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

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
        try:
            yield from self.loader
        except BionetsError as err:    # from a worker, which DataLoader re-raises under lines of its own
            raise BionetsError(str(err).strip().splitlines()[-1].split("BionetsError: ")[-1]) from None


def load_image(path: str) -> Image.Image:
    """The image at ``path`` in RGB, as torchvision's loader reads it, but for 16-bit grayscale (a
    microscope's PNG or TIFF, PIL's modes 'I;16*' and 'I', as which older Pillows open a 16-bit PNG),
    which PIL's RGB conversion clips to white: scaled from 0..65535 to 8 bits first (by the mode's
    range, not the image's, so that images keep their order of brightness). A file PIL cannot read is
    one error naming it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
        if image.mode.startswith("I"):
            pixels = np.asarray(image, dtype=np.float64) / 257.0         # 65535 -> 255
            image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
        return image.convert("RGB")
    except OSError as err:          # PIL's UnidentifiedImageError and truncated files
        raise BionetsError(f"imagefolder image '{path}' cannot be read ({type(err).__name__}): remove or "
                           "replace it") from None
    except Image.DecompressionBombError:
        raise BionetsError(f"imagefolder image '{path}' has more pixels than PIL opens (its guard against "
                           "decompression bombs, PIL.Image.MAX_IMAGE_PIXELS): shrink it, or remove it") from None


def normalization(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std, or the identity with ``normalize=false``."""
    if not cfg.normalize:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def image_folders(cfg: DataConfig, root: Path, train: bool = True) -> tuple[ImageFolder | None, ImageFolder]:
    """The train and val ImageFolders under ``root`` with timm's training / evaluation transforms
    (without ``train``: None and the val one, read without a train folder)."""
    size = cfg.img_size or 224
    mean, std = normalization(cfg)
    transforms = []
    for training in (True, False):
        try:
            augment = training and cfg.augment
            transform = create_transform(size, is_training=augment, auto_augment=cfg.auto_augment if augment else None,
                                         color_jitter=cfg.color_jitter, re_prob=cfg.reprob if augment else 0.0,
                                         re_mode=cfg.remode,
                                         crop_pct=cfg.crop_pct, mean=mean, std=std,
                                         interpolation=cfg.interpolation if augment or cfg.interpolation != "random"
                                         else "bicubic")     # 'random': a random resize for training crops only
        except (AssertionError, KeyError, ValueError) as err:
            raise BionetsError(f"data.auto_augment='{cfg.auto_augment}' is not a timm augmentation string ({err}): "
                               "use e.g. 'rand-m9-mstd0.5', 'augmix-m5' or 'v0'") from None
        transforms.append(_posterize_any_bits(transform))
    return split_folders(root, transforms, train)


def posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every bit count its levels ask for: Pillow 13 refuses 0 bits, which the
    highest magnitudes of RandAugment's 'inc' levels and of AutoAugment's 'v0' policy give (an ImageNet
    epoch met one and ended on a traceback); 0 bits is a black image, as Pillow <= 12 made it."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def _posterize_any_bits(transform):
    """``transform`` with the posterize operations of its RandAugment, AugMix or AutoAugment (timm's
    ``AugmentOp``) computed by :func:`posterize`."""
    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))
        ops += [op for sub_policy in (getattr(step, "policy", None) or []) for op in sub_policy]
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder without hidden entries (``.ipynb_checkpoints``, which Jupyter fills
    with copies of the images it shows, macOS's ``._`` files, a ``.DS_Store``): no hidden folder is a
    class, and no hidden file or folder inside a class folder gives images."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        top = Path(directory).expanduser()           # (as torchvision walks it)

        def visible(path: str) -> bool:
            if any(part.startswith(".") for part in Path(path).relative_to(top).parts):
                return False
            if is_valid_file is not None:
                return is_valid_file(path)
            return has_file_allowed_extension(path, extensions or IMG_EXTENSIONS)

        return ImageFolder.make_dataset(directory, class_to_idx, None, visible, allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        classes = [c for c in classes if not c.startswith(".")]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: k for k, c in enumerate(classes)}


def split_folders(root: Path, transforms=(None, None), train: bool = True) -> tuple[ImageFolder | None, ImageFolder]:
    """The ImageFolders of ``root/train`` and ``root/val`` (a transform each), which must hold the same
    class folders; a missing or empty folder is one error line. Without ``train``: None and val's."""
    splits = [] if train else [None]
    for split, transform in list(zip(("train", "val"), transforms))[0 if train else 1:]:
        folder = root / split
        if not folder.is_dir():
            raise BionetsError(f"imagefolder root '{root}' has no '{split}/' folder: expected "
                               f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        try:
            splits.append(ClassFolders(str(folder), transform=transform, loader=load_image))
        except (FileNotFoundError, RuntimeError) as err:     # no class folder, or an empty one
            said = str(err).splitlines()[0].rstrip(".")
            fix = ("add images to those class folders, or remove them from train/ and val/" if "no valid file" in said
                   else f"put each class's images in a folder of its own ({folder}/<class>/*.jpg)")
            raise BionetsError(f"imagefolder '{folder}': {said}: {fix}") from None
    if not train:
        return None, splits[1]
    if len(splits[0].classes) < 2:
        raise BionetsError(f"imagefolder '{root}' has one class folder ({splits[0].classes[0]}): a classifier "
                           "needs two or more; add the other classes' folders to train/ and val/")
    if splits[0].classes != splits[1].classes:
        only_train = sorted(set(splits[0].classes) - set(splits[1].classes))[:3]
        only_val = sorted(set(splits[1].classes) - set(splits[0].classes))[:3]
        raise BionetsError(f"imagefolder '{root}': train/ and val/ hold different class folders (only in train/: "
                           f"{only_train or 'none'}; only in val/: {only_val or 'none'}): give both the same classes")
    return splits[0], splits[1]


def build_imagefolder(cfg: DataConfig, at: Placement) -> DataBundle:
    train_set, val_set = image_folders(cfg, require_root(cfg.root, "imagefolder", None), train=not at.test_only)
    train = None
    if train_set is not None:
        keep = training_subset(torch.tensor(train_set.targets), cfg.train_fraction, cfg.imbalance_ratio, at.seed)
        if keep is not None:
            train_set.samples = train_set.imgs = [train_set.samples[i] for i in keep.tolist()]
            train_set.targets = [s[1] for s in train_set.samples]
        if len(train_set) < at.batch * at.world_size:
            raise BionetsError(f"imagefolder '{cfg.root}' has {len(train_set)} training images, fewer than one global "
                               f"batch of {at.batch * at.world_size}: lower data.batch_size")
        train = FolderLoader(train_set, at.batch, train=True, workers=cfg.workers, at=at)
    k = len(val_set.classes)            # (train/ holds the same classes)
    return DataBundle(train, FolderLoader(val_set, at.eval_batch, train=False, workers=cfg.workers, at=at),
                      k, 3, cfg.img_size or 224, make_mixup(cfg, k, at.label_smoothing), list(val_set.classes),
                      *normalization(cfg))


def load_gray_folders(root: str | None) -> tuple:
    """(train images uint8 N1HW, train targets, val images, val targets, class names) of the images
    under ``root/train/<class>/`` and ``root/val/<class>/`` as grayscale, all of one square size (say
    Arabic MNIST exported as images), for the theory experiments' linear models."""
    path = require_root(root, "imagefolder", None)
    splits = split_folders(path)
    images = [[np.asarray(image.convert("L")) for image, _ in ds] for ds in splits]
    sizes = {im.shape for split in images for im in split}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise BionetsError(f"the images under '{path}' must all be square and of one size (found "
                           f"{sorted(sizes)[:4]}): resize them (e.g. to 28x28)")
    out = []
    for ds, split in zip(splits, images):
        out += [torch.from_numpy(np.stack(split)).unsqueeze(1), torch.tensor(ds.targets)]
    return (*out, list(splits[0].classes))
