"""What ``build_data`` returns, and where the calling process sits in the run."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bionets.data.config import DataConfig
from bionets.errors import BionetsError


@dataclass
class DataBundle:
    """Loaders and facts about a dataset. ``train``/``test`` yield (float32 NCHW, int64 targets) on
    the CPU (or on the device given to :meth:`to`) and have ``len()`` (batches per epoch of this
    process) and ``set_epoch(epoch)``; ``train`` is None in a bundle built for evaluation (``test_only``)."""

    train: object
    test: object
    num_classes: int
    in_chans: int
    img_size: int
    mixup: Callable | None    # (images, targets) -> (images, soft targets); None without mixup/cutmix
    classes: list[str]
    mean: tuple[float, ...]   # the normalization applied (zeros/ones when data.normalize is false)
    std: tuple[float, ...]

    def to(self, device) -> DataBundle:
        """Serve batches from ``device`` where the loaders hold their split in memory (``TensorLoader``:
        the split moves there once and every batch is gathered, augmented and normalized there, so a
        GPU's step waits for no host-to-device copy); streaming loaders stay as they are."""
        for loader in (self.train, self.test):
            if callable(getattr(loader, "to", None)):
                loader.to(device)
        return self


@dataclass(frozen=True)
class Placement:
    """Process ``rank`` of ``world_size``, the run seed, this process's batch sizes, and whether only
    the test split is wanted (evaluating a checkpoint: the training split's files may be absent)."""

    rank: int
    world_size: int
    seed: int
    batch: int            # per process: data.batch_size // world_size
    eval_batch: int
    label_smoothing: float
    test_only: bool = False

    @classmethod
    def of(cls, cfg: DataConfig, rank: int, world_size: int, seed: int, label_smoothing: float,
           test_only: bool = False) -> Placement:
        if not 0 <= rank < world_size:
            raise BionetsError(f"rank {rank} is outside a world of {world_size} processes")
        if cfg.batch_size % world_size:
            raise BionetsError(f"data.batch_size={cfg.batch_size} is the global batch and must divide evenly "
                               f"over {world_size} processes: use a multiple of {world_size}")
        batch = cfg.batch_size // world_size
        if (cfg.mixup > 0 or cfg.cutmix > 0) and batch % 2:
            raise BionetsError(f"mixup/cutmix need an even batch per process, got {batch} "
                               f"(data.batch_size={cfg.batch_size} over {world_size} processes)")
        return cls(rank, world_size, seed, batch, cfg.eval_batch_size or 2 * batch, label_smoothing, test_only)


def make_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float):
    """timm's ``Mixup`` (per-batch mixup/cutmix with smoothed one-hot targets), or None when off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=label_smoothing,
                 num_classes=num_classes)
