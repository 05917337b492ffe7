"""Quadratic (dendritic-integration) neurons of Dit-CNN (Liu et al., NeurIPS 2024).

A biological neuron integrates its dendritic inputs bilinearly::

    y = w . x + x^T A x + b

instead of ``y = w . x + b``. For Gaussian inputs with mean mu and covariance Sigma,
``E[x^T A x] = mu^T A mu + tr(A Sigma)``: the quadratic term sees the inputs' correlations.

* :class:`QuadraticNeuron` is that neuron for vectors (the theory experiments), with A full or
  low-rank.
* :class:`QuadraticChannel` is the channel-wise quadratic term of the Dit convolutional blocks:
  one quadratic form over the channels at every pixel.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bionets.errors import BionetsError


class QuadraticNeuron(nn.Module):
    """``out_features`` quadratic neurons on vectors: ``y_o = w_o . x + x^T A_o x + b_o``.

    Args:
        in_features: length of x.
        out_features: number of neurons o.
        rank: ``None`` for a full ``A`` (parameter ``A_full`` of shape [out, in, in]); an integer
            ``r`` (1 <= r <= in_features) for the low-rank form ``A_o = U_o V_o^T`` with parameters
            ``U`` and ``V`` of shape [out, in, r], so that ``x^T A_o x = sum_r (x.U_or)(x.V_or)``.
        bias: learn ``b``.

    Initialization: ``w`` and ``b`` as :class:`torch.nn.Linear`; ``A = 0``, so the neuron starts as
    a linear one (as the Dit networks start as their plain twins). In the full form ``A_full`` is
    zero; in the low-rank form ``V`` is zero and ``U`` is drawn like a linear layer's weight
    (uniform +-1/sqrt(in)), so that ``A = U V^T = 0`` yet the gradient reaching ``V`` is not zero
    (``U = V = 0`` would be a saddle point that gradient descent never leaves).

    ``A`` is stored unsymmetrized: only its symmetric part affects the output.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise BionetsError(f"QuadraticNeuron needs in_features >= 1 and out_features >= 1, "
                               f"got {in_features} and {out_features}")
        if rank is not None and not 1 <= rank <= in_features:
            raise BionetsError(f"QuadraticNeuron rank={rank} must be between 1 and in_features={in_features} "
                               "(or None for a full A)")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        if rank is None:
            self.A_full = nn.Parameter(torch.zeros(out_features, in_features, in_features))
        else:
            bound = 1.0 / math.sqrt(in_features)
            self.U = nn.Parameter(torch.empty(out_features, in_features, rank).uniform_(-bound, bound))
            self.V = nn.Parameter(torch.zeros(out_features, in_features, rank))

    @property
    def A(self) -> torch.Tensor:
        """The dense matrices A_o, shape [out, in, in] (``U V^T`` in the low-rank form)."""
        if self.rank is None:
            return self.A_full
        return self.U @ self.V.transpose(1, 2)

    @property
    def extra_params(self) -> int:
        """Parameters of the quadratic term (beyond the linear neuron's w and b)."""
        if self.rank is None:
            return self.A_full.numel()
        return self.U.numel() + self.V.numel()

    def quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """``x^T A_o x`` for every row of x [N, in] and neuron o: [N, out]."""
        n, d = x.shape
        if self.rank is None:
            # (x A_o)_j = sum_i x_i A_oij for every o at once, then dot with x.
            xa = (x @ self.A_full.permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, d)
            return (xa * x.unsqueeze(1)).sum(-1)
        xu = (x @ self.U.permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, self.rank)
        xv = (x @ self.V.permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, self.rank)
        return (xu * xv).sum(-1)   # sum_r (x.U_or)(x.V_or)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise BionetsError(f"QuadraticNeuron expects input [N, {self.in_features}], got {list(x.shape)}")
        return self.linear(x) + self.quadratic(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
