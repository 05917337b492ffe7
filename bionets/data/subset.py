"""Few-shot and long-tailed subsets of a training split."""
from __future__ import annotations

import torch


def stratified_fraction(targets: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random subset: ``fraction`` of each class, at least one each."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        n = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return torch.cat(keep).sort().values


def long_tailed(targets: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a long-tailed subset: class k keeps ``n_max * ratio^(-k / (K-1))`` samples
    (the exponential profile of Cao et al., NeurIPS 2019; class 0 is the head)."""
    gen = torch.Generator().manual_seed(seed)
    classes = targets.unique().tolist()
    n_max = min(int((targets == c).sum()) for c in classes)
    keep = []
    for k, c in enumerate(classes):
        members = (targets == c).nonzero().flatten()
        n = max(1, int(n_max * ratio ** (-k / max(1, len(classes) - 1))))
        keep.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return torch.cat(keep).sort().values


def training_subset(targets: torch.Tensor, fraction: float, imbalance_ratio: float, seed: int) -> torch.Tensor | None:
    """The training indices kept by ``data.imbalance_ratio`` then ``data.train_fraction``; None: all."""
    if fraction >= 1 and imbalance_ratio <= 1:
        return None
    keep = long_tailed(targets, imbalance_ratio, seed) if imbalance_ratio > 1 else torch.arange(len(targets))
    if fraction < 1:
        keep = keep[stratified_fraction(targets[keep], fraction, seed)]
    return keep
