"""Aggregated Response Regularization (ARR) of DNRT (Qiu et al., ICLR 2024).

A biological neuron's aggregated response is specific to the category it sees. ARR keeps, per
class k and hooked layer j, a running mean m_{j,k} of the aggregated responses r_j (the pooled
features that feed the classifier of a CNN; the class token after every block of a ViT), and
pulls every training sample's responses towards its class's mean::

    m_k <- (1 - momentum) * m_k + momentum * r        (per sample, in batch order; the first
                                                        response of a class initializes m_k)
    L_ARR = weight * (1/J) * sum_j mean_elements |r_j - m_{j,y}|      (m detached)

``form='paper'`` compares with the mean before the batch's update (mu^{t-1}, the paper's
equation); ``form='code'`` with the mean just after the sample's own sequential update (mu^t, the
reference code). Both are vectorized: the sequential update over a class's samples r_1..r_n is
``m_i = (1-a)^i m_0 + sum_{l<=i} a (1-a)^(i-l) r_l``, computed with one cumulative sum.
The memory lives in buffers (saved in checkpoints); under DDP the responses of every process are
gathered (in rank order) so that every process applies the same update.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ArrMemory(nn.Module):
    """Class means of J hooked layers: ``mean`` [J, K, D] and ``seen`` [J, K] buffers."""

    def __init__(self, layers: int, classes: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(layers, classes, dim))
        self.register_buffer("seen", torch.zeros(layers, classes, dtype=torch.uint8))  # uint8: DDP broadcasts it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: the memory holds state only, so a model that runs its children in turn
        (an ``nn.Sequential`` that ARR added it to) passes through it unchanged."""
        return x

    def extra_repr(self) -> str:
        j, k, d = self.mean.shape
        return f"layers={j}, classes={k}, dim={d}"


def sequential_means(m0: torch.Tensor, r: torch.Tensor, y: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample EMA means in batch order, vectorized.

    m0 [K, D] the means before the batch, r [N, D] responses, y [N] classes. Returns
    (after_each [N, D]: the class mean right after sample i's update; final [K, D]).
    """
    a = momentum
    n = len(y)
    order = torch.sort(y, stable=True).indices
    ys, rs = y[order], r[order].double()
    start = torch.searchsorted(ys, ys, right=False)                 # first index of each sample's class run
    pos = torch.arange(n, device=y.device) - start + 1               # 1-based position within its class
    decay = torch.tensor(1 - a, dtype=torch.float64, device=r.device)
    # m_i = (1-a)^i * (m0 + sum_{l<=i} a (1-a)^(-l) r_l), with a cumulative sum restarted per class
    scaled = a * rs * decay.pow(-pos.double())[:, None]
    csum = scaled.cumsum(0)
    before_run = torch.where((start > 0)[:, None], csum[(start - 1).clamp_min(0)], torch.zeros_like(csum))
    within = csum - before_run
    after = decay.pow(pos.double())[:, None] * (m0[ys].double() + within)
    out = torch.empty_like(after)
    out[order] = after
    final = m0.double().clone()
    last = torch.ones(n, dtype=torch.bool, device=y.device)
    last[:-1] = ys[1:] != ys[:-1]
    final[ys[last]] = after[last]
    return out.to(r.dtype), final.to(m0.dtype)


def gather_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every DDP process in rank order (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def arr_loss(memory: ArrMemory, responses: list[torch.Tensor], targets: torch.Tensor, *, weight: float,
             momentum: float, form: str = "paper", update: bool = True) -> torch.Tensor:
    """The ARR term for a batch of responses (one [N, D] tensor per hooked layer); updates ``memory``."""
    losses = []
    for j, r in enumerate(responses):
        r = r.float()
        with torch.no_grad():
            all_r, all_y = gather_across_ranks(r.detach()), gather_across_ranks(targets)
            m0, seen = memory.mean[j], memory.seen[j].bool()
            first = torch.zeros_like(seen)
            first_idx = torch.full((len(seen),), len(all_y), dtype=torch.long, device=all_y.device)
            first_idx.scatter_reduce_(0, all_y, torch.arange(len(all_y), device=all_y.device), "amin")
            new = (~seen) & (first_idx < len(all_y))
            first[new] = True
            m0 = torch.where(new[:, None], all_r[first_idx.clamp_max(len(all_y) - 1)], m0)
            after, final = sequential_means(m0, all_r, all_y, momentum)
            if form == "paper":
                target_means = m0[targets]
            else:
                rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
                target_means = after[rank * len(targets):(rank + 1) * len(targets)]
            if update:
                memory.mean[j] = final
                memory.seen[j] |= first.to(torch.uint8)
        losses.append((r - target_means).abs().mean())
    return weight * torch.stack(losses).mean()
