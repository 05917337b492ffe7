"""Synthetic Gaussian classes for the Dit-CNN theory experiments.

Class k draws x ~ N(mu_k, Sigma_k). Each mean lies ``separation / 2`` from the origin in a random
direction, mu_k = (separation / 2) u_k / |u_k| with u_k ~ N(0, I_d) (so two means are at most
``separation`` apart; the distance depends on the draw). Covariances are random SPD matrices
``Q diag(s) Q^T`` (Q the orthogonal factor of a Gaussian matrix, s uniform in [0.25, 2.5]).
With ``kind='identical'`` every class shares Sigma_0 (the Bayes boundary is linear); with
``kind='different'`` each class has its own (the Bayes boundary is quadratic).
"""
from __future__ import annotations

import torch

from bionets.data.config import GaussianConfig


def _random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = 0.25 + 2.25 * torch.rand(d, generator=gen, dtype=torch.float64)
    return q @ torch.diag(s) @ q.T


def gaussian_classes(cfg: GaussianConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [K, d], covariances [K, d, d]) in float64, drawn from ``cfg.seed`` alone."""
    gen = torch.Generator().manual_seed(cfg.seed)
    k, d = cfg.num_classes, cfg.dim
    directions = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if d == 1 and k == 2:      # random signs put both means at one point half the time: one on each side
        directions = torch.tensor([[1.0], [-1.0]], dtype=torch.float64) * directions[0].sign()
    means = cfg.separation * directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12) / 2
    if cfg.kind == "identical":
        covs = _random_spd(d, gen).expand(k, d, d).clone()
    else:
        covs = torch.stack([_random_spd(d, gen) for _ in range(k)])
    return means, covs


def sample_gaussian(means: torch.Tensor, covs: torch.Tensor, n: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples x = mu_k + L_k z (L_k L_k^T = Sigma_k, z ~ N(0, I)) as (float32 [n, d], int64 [n]),
    classes balanced: class k gets n // K samples, the first n % K classes one more; ordered by class."""
    k, d = means.shape
    counts = [n // k + (1 if c < n % k else 0) for c in range(k)]
    chol = torch.linalg.cholesky(covs.double())
    xs, ys = [], []
    for c, m in enumerate(counts):
        z = torch.randn(m, d, generator=generator, dtype=torch.float64)
        xs.append(means[c].double() + z @ chol[c].T)
        ys.append(torch.full((m,), c, dtype=torch.long))
    return torch.cat(xs).float(), torch.cat(ys)
