"""Synthetic Gaussian classes for the Dit-CNN theory experiments.

Class k draws x ~ N(mu_k, Sigma_k). Means lie ``separation`` apart along random directions;
covariances are random SPD matrices ``Q diag(s) Q^T`` with eigenvalues in [0.25, 2.5]. With
``kind='identical'`` every class shares Sigma_0 (the Bayes boundary is linear); with
``kind='different'`` each class has its own (the Bayes boundary is quadratic).
"""
from __future__ import annotations

import torch

from bionets.data.config import GaussianConfig
from bionets.errors import BionetsError

KINDS = ("identical", "different")


def _random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = 0.25 + 2.25 * torch.rand(d, generator=gen, dtype=torch.float64)
    return q @ torch.diag(s) @ q.T


def gaussian_classes(cfg: GaussianConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [K, d], covariances [K, d, d]) in float64, drawn from ``cfg.seed``."""
    if cfg.kind not in KINDS:
        raise BionetsError(f"data.gaussian.kind must be one of {KINDS}, got '{cfg.kind}'")
    gen = torch.Generator().manual_seed(cfg.seed)
    k, d = cfg.num_classes, cfg.dim
    directions = torch.randn(k, d, generator=gen, dtype=torch.float64)
    means = cfg.separation * directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12) / 2
    if cfg.kind == "identical":
        covs = _random_spd(d, gen).expand(k, d, d).clone()
    else:
        covs = torch.stack([_random_spd(d, gen) for _ in range(k)])
    return means, covs


def sample_gaussian(means: torch.Tensor, covs: torch.Tensor, n: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples with balanced classes (class k gets n//K, the first n % K one more)."""
    k, d = means.shape
    counts = [n // k + (1 if c < n % k else 0) for c in range(k)]
    chol = torch.linalg.cholesky(covs)
    xs, ys = [], []
    for c, m in enumerate(counts):
        z = torch.randn(m, d, generator=generator, dtype=torch.float64)
        xs.append(means[c] + z @ chol[c].T)
        ys.append(torch.full((m,), c, dtype=torch.long))
    return torch.cat(xs).float(), torch.cat(ys)
