"""Grad R (Gradient Rewiring, Chen et al., IJCAI 2021): the baseline STDS is compared with.

Each pruned weight keeps a fixed sign ``s = sign(w_init)`` and a strength ``theta = |w_init|``
that may go negative; the weight is ``w = s * max(theta, 0)`` (a synapse with ``theta <= 0`` is
pruned and can be rewired back). Training is Adam on ``g = dL/dw`` **ignoring the ReLU gate**, plus
a Laplace prior centred at ``mu = ln(2 (1 - p)) / alpha`` for the target sparsity ``p``::

    theta <- theta - eta_t * s * m_hat / (sqrt(v_hat) + eps) - eta_t * alpha * sign(theta - mu)

Here the gate is a parametrization (:class:`SignedStrength`) whose backward passes
``dL/dtheta = s * dL/dw``; since ``s^2 = 1``, Adam's moments of ``s * g`` are ``s * m(g)`` and
``v(g)``, so a plain Adam step on theta is exactly the first term, and :class:`GradR` adds the
prior term. BatchNorm and every parameter that is not a strength take the plain Adam step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from bionets.errors import BionetsError
from bionets.layers.stds import SparseReparam, no_layer_error, reparameterize, select_layers, weight_reparam


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
    if not 0.5 <= target_sparsity < 1:
        raise BionetsError(f"Grad R target sparsity p must be in [0.5, 1) (its prior centre is ln(2(1-p))/alpha), "
                           f"got {target_sparsity}")
    if not alpha > 0:
        raise BionetsError(f"Grad R prior strength alpha must be > 0 (default 1e-3), got {alpha}")


class SignedStrength(SparseReparam):
    """Grad R's parametrization ``theta -> s * max(theta, 0)`` with the fixed sign buffer ``s``."""

    def __init__(self, weight: torch.Tensor, alpha: float = 1e-3, target_sparsity: float = 0.95):
        super().__init__()
        self.alpha, self.target_sparsity = alpha, target_sparsity
        self.mu = prior_centre(alpha, target_sparsity)
        self.register_buffer("s", torch.sign(weight.detach()))

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


def apply_gradr(model: nn.Module, alpha: float = 1e-3, target_sparsity: float = 0.95, *,
                include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                types: Iterable[str] = ("conv", "linear")) -> list[str]:
    """Give the chosen layers of ``model`` Grad R's fixed sign and strength, in place; return their names."""
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

