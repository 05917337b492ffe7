"""STDS: the State Transition of Dendritic Spines reparameterization (Chen et al., ICML 2022).

Each pruned layer stores a latent weight theta; the weight the layer computes with is the soft
threshold of theta::

    w = sign(theta) * max(|theta| - D, 0)                       (computed as theta - clamp(theta, -D, D))

Weights with ``|theta| <= D`` are exactly zero. The backward pass is **straight-through**
(``stmod``, the method): ``dw/dtheta = 1``, so a zero weight keeps receiving gradient and grows
back when the gradient pushes ``|theta|`` past D again (the "state transition" of a spine).
(At theta = 0 exactly the reference code's gradient is ``sign(0)^2 = 0``, which would freeze a
zero-initialized layer for good; here it is 1 there too, and the backward costs nothing.)
``st`` keeps the true gradient ``1[|theta| > D]`` (no regrowth); ``identity`` is the dense
baseline ``w = theta``.

D is one global value (in theta units), raised after every optimizer step n of N:

* sine:   ``D_n = D_max * (1 - cos(pi * n / N)) / 2``
* linear: ``D_n = D_max * n / N``
* fixed:  ``D_n = D_max``; theta starts at ``sign(w_0) * (|w_0| + D_max)`` so that the first
  effective weights are the layer's initial ones (the parametrization's ``right_inverse``).

The reparameterization is a :mod:`torch.nn.utils.parametrize` parametrization of the layer's
``weight`` (a :class:`~bionets.layers.sparse_reparam.SparseReparam`, as Grad R's), so ``layer.weight``
is the effective weight, ``layer.parametrizations.weight.original`` is theta, and :func:`export`
bakes the effective weights (zeros included) into a plain model.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from bionets.errors import BionetsError, is_real, require_module, unknown, whole
# (export, sparsity, Sparsity and pruned_layers are the sparse reparameterizations' in general, also STDS's API)
from bionets.layers.sparse_reparam import (Sparsity, SparseReparam, export, no_layer_error,  # noqa: F401
                                           pruned_layers, reparameterize, select_layers, sparsity, weight_reparam)

SPARSE_FUNCTIONS = ("stmod", "st", "identity")
SCHEDULES = ("sine", "linear", "fixed")


class _SoftThreshold(torch.autograd.Function):
    """Forward: the soft threshold. Backward: straight through (``stmod``: ``dw/dtheta = 1``, the
    gradient passes unchanged, also in the flat region) or the true derivative ``1[|theta| > D]``,
    i.e. ``1[w != 0]`` (``st``). Forward-mode AD (``jvp``) uses the same derivative."""

    generate_vmap_rule = True        # plain tensor ops both ways: torch.func.vmap batches them itself

    @staticmethod
    def forward(theta: torch.Tensor, d: torch.Tensor, straight_through: bool) -> torch.Tensor:
        if d.device.type == "cpu":   # one fused kernel; D is read without a device sync
            value = d.item()
            if not 0 <= value < math.inf:       # (softshrink's own check names a 'lambda')
                raise threshold_error(value)
            return torch.nn.functional.softshrink(theta, value)
        return theta - theta.clamp(-d, d)     # no .item(): D stays on the device (checked where it is set)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:    # this form also runs under torch.func transforms
        ctx.straight_through = inputs[2]
        if not ctx.straight_through:
            ctx.save_for_backward(output)
            ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.straight_through:
            return grad, None, None
        (w,) = ctx.saved_tensors
        return torch.where(w != 0, grad, 0.0), None, None

    @staticmethod
    def jvp(ctx, theta_t: torch.Tensor, d_t, straight_through_t) -> torch.Tensor:
        if ctx.straight_through:
            return theta_t
        (w,) = ctx.saved_tensors
        return torch.where(w != 0, theta_t, 0.0)


def soft_threshold(theta: torch.Tensor, d: torch.Tensor | float, sparse_function: str = "stmod") -> torch.Tensor:
    """``sign(theta) * max(|theta| - d, 0)`` with the gradient of ``sparse_function``.

    ``d`` is a finite real number >= 0 or a 0-d tensor of one. This runs in every forward, so a
    tensor's value is checked only where reading it costs no device sync (on the CPU, where the
    fused kernel reads it anyway); a CUDA tensor's only by its shape and dtype: check it where it is
    set (:func:`check_threshold`, as :class:`SoftThreshold` and :func:`set_threshold` do).
    """
    if sparse_function == "identity":
        return theta
    check_sparse_function(sparse_function)
    if isinstance(d, torch.Tensor):
        _check_threshold_tensor(d)
    else:
        check_threshold(d)
    d = torch.as_tensor(d, dtype=theta.dtype, device=theta.device)
    if torch.compiler.is_compiling():
        # torch.compile / torch.export / the ONNX exporter: plain ops, one graph (Dynamo breaks the
        # graph at an autograd function with a jvp, and at the CPU path's D.item()); the same forward
        # and gradient: clamp's derivative makes theta - clamp the true 1[|theta| > D] (st), and
        # the detached difference passes the gradient straight through (stmod)
        w = theta - theta.clamp(-d, d)
        return theta + (w - theta).detach() if sparse_function == "stmod" else w
    return _SoftThreshold.apply(theta, d, sparse_function == "stmod")


def threshold_at(schedule: str, d_max: float, step: int, total_steps: int) -> float:
    """D after ``step`` of ``total_steps`` optimizer steps (sine, linear or fixed schedule)."""
    check_threshold(d_max, "STDS d_max")
    for name, value in (("step", step), ("total_steps", total_steps)):
        # (the sine schedule is symmetric: a negative step gave a positive D)
        if (n := whole(value)) is None or n < 0:
            raise BionetsError(f"STDS schedule {name} must be a whole number >= 0, got {value!r}")
    frac = min(1.0, step / max(1, total_steps))
    if schedule == "sine":
        return d_max * (1.0 - math.cos(math.pi * frac)) / 2.0
    if schedule == "linear":
        return d_max * frac
    if schedule == "fixed":
        return d_max
    raise unknown("STDS schedule", str(schedule), SCHEDULES)


class SoftThreshold(SparseReparam):
    """The STDS parametrization ``theta -> sign(theta) * max(|theta| - D, 0)``; D is the buffer ``d``."""

    what = "STDS"
    schedule: dict | None = None    # the settings of the schedule that drives D (set by the stds mechanism)

    def __init__(self, sparse_function: str = "stmod", d: float = 0.0):
        super().__init__()
        check_sparse_function(sparse_function)
        d = check_threshold(d)
        self.sparse_function = sparse_function
        self.register_buffer("d", torch.tensor(d, dtype=torch.float64))   # cast to the weight's dtype on use

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return soft_threshold(theta, self.d, self.sparse_function)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """``theta = sign(w) * (|w| + D)``: the theta whose effective weight is ``w``."""
        if self.sparse_function == "identity":
            return w
        return w + torch.sign(w) * self.d.to(w.dtype)

    def extra_repr(self) -> str:
        return f"{self.sparse_function}, D={self.d.item():.4g}"

    def differences(self, new: SoftThreshold) -> list[str]:
        """The sparse function, and D where no schedule drives it: a layer the ``stds`` mechanism
        made carries its schedule's settings (``schedule``), which are compared instead (D is the
        schedule's state), and where ``new`` comes with a schedule, D is the schedule's from now on."""
        if self.schedule is not None and new.schedule is not None:
            return schedule_differences(self.schedule, new.schedule)
        out = []
        if new.sparse_function != self.sparse_function:
            out.append(f"sparse_function {self.sparse_function!r} -> {new.sparse_function!r}")
        if self.schedule is None and new.schedule is None:
            had, want = self.d.item(), new.d.to(self.d.dtype).item()      # (at apply time: a sync is fine)
            if had != want:
                out.append(f"d {had:g} -> {want:g}")
        return out


def schedule_differences(had: dict, want: dict) -> list[str]:
    """``'setting old -> new'`` for each STDS schedule setting (:mod:`bionets.mechanisms.stds`) that differs."""
    return [f"{k} {had.get(k)!r} -> {want[k]!r}" for k in want if had.get(k) != want[k]]


def check_sparse_function(name: str) -> None:
    if name not in SPARSE_FUNCTIONS:
        raise unknown("sparse function", str(name), SPARSE_FUNCTIONS)


def threshold_error(d, what: str = "STDS threshold D") -> BionetsError:
    got = f"{d!r}" if isinstance(d, numbers.Real) else f"{type(d).__name__} {d!r}"
    return BionetsError(f"{what} must be a finite number >= 0 (in theta units, e.g. 1.0 with Adam lr 1e-4), got {got}")


def _check_threshold_tensor(d: torch.Tensor, what: str = "STDS threshold D") -> None:
    """A tensor D's shape and dtype (no device sync: fit for every forward)."""
    if d.ndim != 0 or d.dtype == torch.bool or d.is_complex():
        raise BionetsError(f"{what} must be a finite number >= 0 or a 0-d real tensor of one, got a tensor of "
                           f"shape {tuple(d.shape)} and dtype {d.dtype}")


def check_threshold(d, what: str = "STDS threshold D") -> float:
    """``d`` (a real number or a 0-d tensor) as a float, if it is finite and >= 0; else one line.
    A tensor's value is read (a device sync on a GPU): call this where D is set, not per forward."""
    if isinstance(d, torch.Tensor):
        _check_threshold_tensor(d, what)
        value = d.item()
    elif is_real(d):
        value = float(d)
    else:
        raise threshold_error(d, what)
    if not 0 <= value < math.inf:               # NaN fails here too
        raise threshold_error(value, what)
    return value


def apply_stds(model: nn.Module, sparse_function: str = "stmod", d: float = 0.0, *, include: Iterable[str] = ("*",),
               exclude: Iterable[str] = (), types: Iterable[str] = ("conv", "linear"),
               schedule: dict | None = None) -> list[str]:
    """Reparameterize the chosen layers of ``model`` in place with the STDS soft threshold at D = ``d``.

    Theta is initialized by ``right_inverse`` so the effective weights start as the layer's own.
    Returns the names of the reparameterized layers (those done before, with the same sparse
    function and D, included); raises :class:`BionetsError` if no layer is eligible, or if a chosen
    layer carries STDS with another sparse function or D already. ``schedule`` (the ``stds``
    mechanism's settings) marks the layers as driven by that schedule: D is then its state, and a
    layer made before is compared by its schedule and sparse function, not by D.
    """
    require_module(model, "apply_stds")
    check_sparse_function(sparse_function)
    d = check_threshold(d)
    names = select_layers(model, include, exclude, types)
    if not names:
        raise no_layer_error("STDS", model, include, exclude, types)

    def make(module: nn.Module) -> SoftThreshold:
        reparam = SoftThreshold(sparse_function, d)
        reparam.schedule = schedule
        return reparam

    new, done = reparameterize(model, names, make)
    if schedule is not None:        # layers made before without a schedule are driven by this one now
        for name in done:
            weight_reparam(model.get_submodule(name)).schedule = schedule
    return new + done


def soft_thresholds(model: nn.Module) -> list[SoftThreshold]:
    """The STDS parametrizations of ``model``, one per reparameterized layer."""
    reparams = [weight_reparam(m) for _, m in pruned_layers(model)]
    return [p for p in reparams if isinstance(p, SoftThreshold)]


@torch.no_grad()
def set_threshold(model: nn.Module, d: float) -> int:
    """Set D of every STDS layer of ``model``; returns how many layers were set."""
    require_module(model, "set_threshold")
    d = check_threshold(d)
    layers = soft_thresholds(model)
    for p in layers:
        p.d.fill_(d)
    return len(layers)


