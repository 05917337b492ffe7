"""Whole-split tensors served in batches, augmented per batch with torch ops (airbench style).

The training order comes from torch's ``DistributedSampler`` (also with one process), so the
global batch k of an N-process run is, as a set, the batch k of a 1-process run with the same
global batch size. Augmentation draws from a generator seeded by (seed, epoch, rank): iterating
an epoch twice gives the same batches, which makes resuming a run exact.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def to_device_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor (random draws, indices) moved to ``like``'s device; to a GPU through pinned
    memory, so the copy queues behind the GPU's work instead of waiting for it."""
    if t.device == like.device:
        return t
    if like.device.type == "cuda":
        return t.pin_memory().to(like.device, non_blocking=True)
    return t.to(like.device)


def random_crop(pad: int, flip: bool) -> Augment:
    """Zero-pad by ``pad``, crop back at a random offset per image, optionally flip left-right:
    torchvision's ``RandomCrop(size, padding=pad)`` (+ ``RandomHorizontalFlip``) on a whole batch.

    The crop is two gathers, rows then columns, with per-image offsets (no per-image Python work).
    Apply it to images in [0, 1] before normalization, so the padding is black as in torchvision.
    The draws come from ``gen`` (a CPU generator) wherever x is, so every device sees the same batches.
    """

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen)
        mirror = torch.rand(n, generator=gen) < 0.5 if flip else None
        dy, dx = to_device_of(torch.cat([dy, dx], 1), x).unbind(1)
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
        cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
        out = padded.gather(2, rows).gather(3, cols)
        if flip:
            out = torch.where(to_device_of(mirror, x).view(n, 1, 1, 1), out.flip(3), out)
        return out

    return augment


class TensorLoader:
    """Batches of (float32 NCHW images, int64 targets) from tensors held in memory.

    ``images`` may be uint8 (scaled by 1/255) or float; normalization uses ``mean``/``std`` per
    channel. Training batches shuffle, augment and drop the last incomplete batch; test batches
    keep every sample, sharded over ranks as ``indices[rank::world_size]`` without padding.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *, train: bool,
                 mean: tuple[float, ...], std: tuple[float, ...], augment: Augment | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        self.images, self.targets, self.batch_size = images, targets.long(), batch_size
        self.train, self.augment = train, augment
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.sampler = DistributedSampler(range(len(targets)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True) if train else None

    def to(self, device: torch.device | str) -> TensorLoader:
        """Hold the split on ``device`` and build every batch there (gather, augment, normalize)."""
        self.images, self.targets = self.images.to(device), self.targets.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        """This process's sample indices for the current epoch, in the order they are served."""
        if self.sampler is not None:
            return torch.tensor(list(self.sampler), dtype=torch.long)
        return torch.arange(len(self.targets))[self.rank::self.world_size]     # (empty for a rank beyond them)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(range(self.rank, len(self.targets), self.world_size))
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = to_device_of(self.indices(), self.images)
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) % 2**63)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[sel]
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            if self.train and self.augment is not None:
                x = self.augment(x, gen)
            yield (x - self.mean) / self.std, self.targets[sel]
