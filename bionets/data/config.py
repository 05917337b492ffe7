"""The ``data:`` section of a run config."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from bionets.configbase import PathText, Section, Seed


class GaussianConfig(Section):
    """Two (or more) Gaussian classes for the theory experiments.

    ``kind='identical'``: every class shares one covariance (the Bayes boundary is linear);
    ``kind='different'``: each class has its own covariance (the Bayes boundary is quadratic).
    Means and covariances are drawn once from ``seed``; samples are drawn from them.
    """

    dim: int = Field(2, ge=1)
    num_classes: int = Field(2, ge=2)
    kind: Literal["identical", "different"] = "different"
    n_train: int = Field(1000, ge=1)
    n_test: int = Field(5000, ge=1)
    separation: float = Field(1.0, gt=0)  # each class mean lies separation/2 from the origin
    seed: Seed = 0


class DataConfig(Section):
    """Which dataset, where it lies, how it is batched, subset and augmented (docs/data.md)."""

    name: str = "digits"               # digits | cifar10 | cifar100 | mnist | imagefolder | gaussian
    root: PathText | None = None       # --data-root; required for everything but digits/gaussian
    download: bool = False             # let torchvision download cifar/mnist into root
    batch_size: int = Field(128, ge=1)  # global batch (split across DDP processes)
    eval_batch_size: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)      # DataLoader workers (imagefolder)
    train_fraction: float = Field(1.0, gt=0, le=1)  # stratified subset of the training split
    imbalance_ratio: float = Field(1.0, ge=1)  # long-tailed training split (max/min class count)
    augment: bool = True               # the dataset's standard augmentation
    normalize: bool = True
    img_size: int | None = Field(None, ge=1)  # imagefolder train crop / resize
    crop_pct: float = Field(0.875, gt=0, le=1)
    auto_augment: str | None = None    # timm string, e.g. 'rand-m9-mstd0.5'
    color_jitter: float = Field(0.4, ge=0)   # imagefolder, without auto_augment (timm's default)
    reprob: float = Field(0.0, ge=0, le=1)   # random erasing
    remode: Literal["pixel", "const", "rand"] = "pixel"   # random erasing fill (timm's train.py default)
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"   # imagefolder resize ('random': timm train.py's, training only)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    gaussian: GaussianConfig = GaussianConfig()

    @field_validator("auto_augment")
    @classmethod
    def _sections_have_values(cls, text: str | None) -> str | None:
        """timm skips a section of the string that holds no number (a misspelt ``-inc``), silently."""
        if text is None:
            return text
        policy, *sections = text.split("-")
        bare = [s for s in sections if not re.search(r"\d", s) and not (policy == "rand" and s.startswith("t"))]
        if bare:
            raise ValueError(f"section '{bare[0]}' has no value, and timm would skip it: write it as in "
                             "'rand-m9-mstd0.5-inc1' (name then number)")
        return text


IMAGEFOLDER_ONLY = ("img_size", "crop_pct", "auto_augment", "color_jitter", "reprob", "remode", "interpolation",
                    "workers")      # the in-memory datasets augment on their own (crop, flip) and batch in the process
IN_MEMORY = ("digits", "cifar10", "cifar100", "mnist", "gaussian")     # the datasets that do not take them


FILELESS = ("digits", "gaussian")         # bundled with scikit-learn, or generated: no files to read or fetch


def unused_data_options_note(cfg: DataConfig) -> str | None:
    """A note naming the image-folder options set away from their defaults on a dataset that does not
    take them (RandAugment on CIFAR, say), and a data root or download on one that reads no files
    (a run meant for CIFAR that forgot data.name), or a download on the image folders (nothing fetches
    them): they change nothing there."""
    if cfg.name == "imagefolder" and cfg.download:
        return ("note: data.name=imagefolder does not take data.download=true (no image folder is downloaded: put "
                "train/ and val/ under data.root yourself)")
    if cfg.name not in IN_MEMORY:
        return None
    notes = []
    if cfg.name in FILELESS and (cfg.root is not None or cfg.download):
        unread = [f"root={cfg.root}"] * (cfg.root is not None) + ["download=true"] * cfg.download
        notes.append(f"data.{', data.'.join(unread)} (it reads no files: set data.name to the dataset there)")
    changed = [f"{k}={getattr(cfg, k)}" for k in IMAGEFOLDER_ONLY
               if getattr(cfg, k) != DataConfig.model_fields[k].default]
    if changed:
        notes.append(f"data.{', data.'.join(changed)} (imagefolder's options; ignored)")
    return f"note: data.name={cfg.name} does not take {'; nor '.join(notes)}" if notes else None
