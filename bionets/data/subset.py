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
