"""Grad R (Gradient Rewiring, Chen et al., IJCAI 2021): the baseline STDS is compared with.

Each pruned weight keeps a fixed sign ``s = sign(w_init)`` and a strength ``theta = |w_init|``
that may go negative (an exact zero of ``w_init`` gets ``s = +1`` or ``-1``, see below); the
weight is ``w = s * max(theta, 0)`` (a synapse with ``theta <= 0`` is pruned and can be rewired
back). Training is Adam on ``g = dL/dw`` **ignoring the ReLU gate**, plus a Laplace prior centred
at ``mu = ln(2 (1 - p)) / alpha`` for the target sparsity ``p``::

    theta <- theta - eta_t * s * m_hat / (sqrt(v_hat) + eps) - eta_t * alpha * sign(theta - mu)

Here the gate is a parametrization (:class:`SignedStrength`) whose backward passes
``dL/dtheta = s * dL/dw``; since ``s^2 = 1``, Adam's moments of ``s * g`` are ``s * m(g)`` and
``v(g)``, so a plain Adam step on theta is exactly the first term, and :class:`GradR` adds the
prior term. BatchNorm and every parameter that is not a strength take the plain Adam step.

An exact zero has no sign, and ``sign(0) = 0`` would make ``dL/dtheta = s * g = 0``: the synapse
(a whole zero-initialized layer, such as a timm classifier head) would never learn. The paper's
weights start random, never exactly zero, with signs split evenly between excitatory and
inhibitory; so an exact zero here gets ``s = +1`` or ``-1`` with equal chance, drawn from a
generator seeded with 0 (the same signs on every process and in every run, whatever torch's global
seed), with ``theta = 0``: its weight starts at zero, and the first gradient decides whether it
grows (``-g`` has the sign ``s``) or is pruned. ``s`` is a buffer: checkpoints keep it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from bionets.errors import BionetsError, is_real, require_module
from bionets.layers.sparse_reparam import SparseReparam, no_layer_error, reparameterize, select_layers, weight_reparam


class _SignedGate(torch.autograd.Function):
    """Forward ``s * max(theta, 0)``; backward ``s * grad`` (the gate is ignored; forward-mode AD's
    ``jvp`` likewise gives ``s * tangent``)."""

    generate_vmap_rule = True        # plain tensor ops both ways: torch.func.vmap batches them itself

    @staticmethod
    def forward(theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return theta.clamp(min=0) * s

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:    # this form also runs under torch.func transforms
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (s,) = ctx.saved_tensors
        return grad * s, None

    @staticmethod
    def jvp(ctx, theta_t: torch.Tensor, s_t) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return theta_t * s


def prior_centre(alpha: float, target_sparsity: float) -> float:
    """``mu = ln(2 (1 - p)) / alpha``, defined for a target sparsity ``0.5 <= p < 1``."""
    check_prior(alpha, target_sparsity)
    return math.log(2.0 * (1.0 - target_sparsity)) / alpha


def check_prior(alpha: float, target_sparsity: float) -> None:
    if not (is_real(target_sparsity) and 0.5 <= target_sparsity < 1):
        raise BionetsError(f"Grad R target sparsity p must be in [0.5, 1) (its prior centre is ln(2(1-p))/alpha), "
                           f"got {target_sparsity!r}")
    if not (is_real(alpha) and 0 < alpha < math.inf):     # inf: every theta -inf after one step, all pruned
        raise BionetsError(f"Grad R prior strength alpha must be a finite number > 0 (default 1e-3), got {alpha!r}")


class SignedStrength(SparseReparam):
    """Grad R's parametrization ``theta -> s * max(theta, 0)`` with the fixed sign buffer ``s``
    (``sign(w_init)``; +1 or -1 by :func:`fixed_signs` where ``w_init`` is exactly 0)."""

    what = "Grad R"

    def __init__(self, weight: torch.Tensor, alpha: float = 1e-3, target_sparsity: float = 0.95):
        super().__init__()
        self.mu = prior_centre(alpha, target_sparsity)
        self.alpha, self.target_sparsity = alpha, target_sparsity
        self.register_buffer("s", fixed_signs(weight.detach()))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        s = self.s.to(theta.dtype)
        if torch.compiler.is_compiling():       # plain ops (one graph); gradient s * grad, as the function's
            return theta * s + (theta.clamp(min=0) * s - theta * s).detach()
        return _SignedGate.apply(theta, s)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """``theta = s * w`` (``|w_init|`` for the initial weights)."""
        return w * self.s.to(w.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, p={self.target_sparsity:g}, mu={self.mu:.4g}"

    def differences(self, new: SignedStrength) -> list[str]:
        return [f"{k} {getattr(self, k)!r} -> {getattr(new, k)!r}" for k in ("alpha", "target_sparsity")
                if getattr(self, k) != getattr(new, k)]


def fixed_signs(weight: torch.Tensor) -> torch.Tensor:
    """``sign(weight)``, with +1 or -1 (equal chance, from a generator seeded with 0) where
    ``weight`` is exactly 0: a sign of 0 would freeze the weight (``dL/dtheta = s * g = 0``)."""
    s = torch.sign(weight)
    if s.device.type == "meta":     # shapes only: no values to sign
        return s
    zero = s == 0
    if not bool(zero.any()):        # (once, when the layer is reparameterized)
        return s
    coin = torch.randint(0, 2, s.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.where(zero, coin.to(device=s.device, dtype=s.dtype), s)


def apply_gradr(model: nn.Module, alpha: float = 1e-3, target_sparsity: float = 0.95, *,
                include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                types: Iterable[str] = ("conv", "linear")) -> list[str]:
    """Give the chosen layers of ``model`` Grad R's fixed sign and strength, in place; return their
    names (those done before, with the same alpha and target sparsity, included; other settings
    there are an error)."""
    require_module(model, "apply_gradr")
    check_prior(alpha, target_sparsity)
    names = select_layers(model, include, exclude, types)
    if not names:
        raise no_layer_error("Grad R", model, include, exclude, types)
    new, done = reparameterize(model, names, lambda m: SignedStrength(m.weight, alpha, target_sparsity))
    return new + done


def strengths(model: nn.Module) -> list[tuple[str, nn.Parameter, SignedStrength]]:
    """(name, theta parameter, parametrization) of every Grad R layer."""
    out = []
    for name, m in model.named_modules():
        p = weight_reparam(m)
        if isinstance(p, SignedStrength):
            out.append((f"{name}.parametrizations.weight.original", m.parametrizations.weight.original, p))
    return out


class GradR(torch.optim.Adam):
    """Adam plus Grad R's prior step on the param groups that carry ``alpha`` and ``mu``.

    ``theta <- theta - lr * alpha * sign(theta - mu)`` is applied before Adam's step (Adam's step
    does not depend on theta without weight decay, so this is the update above with the sign taken
    at the old theta). Groups without ``alpha`` (BatchNorm, biases, unpruned layers) are plain Adam.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("alpha"):
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(torch.sign(p - group["mu"]), alpha=group["lr"] * group["alpha"])
        super().step()
        return loss

