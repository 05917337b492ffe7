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
``weight``, so ``layer.weight`` is the effective weight, ``layer.parametrizations.weight.original``
is theta, and :func:`export` bakes the effective weights (zeros included) into a plain model.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from bionets.errors import BionetsError, is_real, name_list, require_module, unknown, whole

SPARSE_FUNCTIONS = ("stmod", "st", "identity")
SCHEDULES = ("sine", "linear", "fixed")
LAYER_TYPES = {"conv": nn.modules.conv._ConvNd, "linear": nn.Linear}


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


class SparseReparam(nn.Module):
    """Base of the weight parametrizations whose zeros count as pruned (STDS, Grad R)."""

    what = "sparse"             # the mechanism's name in messages

    def differences(self, new: SparseReparam) -> list[str]:
        """``'setting old -> new'`` for each setting in which ``new`` (of the same type, asked for
        now) differs from this one (made before); none: applying it again changes nothing."""
        return []


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


# -- choosing layers ------------------------------------------------------------------------------

def _patterns(value, what: str) -> list[str]:
    """``value`` as a list of names or glob patterns (strings); else one line."""
    try:
        items = name_list(value, what)          # (a bare string: one line of its own)
    except TypeError:
        raise BionetsError(f"{what} takes a list of names or glob patterns, got {type(value).__name__} "
                           f"{value!r}") from None
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise BionetsError(f"{what} takes names or glob patterns as strings, got {bad[0]!r} "
                           f"({type(bad[0]).__name__}) in {items!r}: write {[str(p) for p in items]!r}")
    return items


def _types(types: Iterable[str]) -> tuple[type, ...]:
    out = []
    for t in _patterns(types, "types"):
        if t not in LAYER_TYPES:
            raise unknown("layer type", t, LAYER_TYPES)
        out.append(LAYER_TYPES[t])
    if not out:
        raise BionetsError(f"types is empty, so no layer can be chosen: give {' or '.join(map(repr, LAYER_TYPES))} "
                           "or both")
    return tuple(out)


def select_layers(model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                  types: Iterable[str] = ("conv", "linear")) -> list[str]:
    """Names of the layers of ``types`` whose name matches an ``include`` glob and no ``exclude`` glob."""
    require_module(model, "select_layers")
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    classes = _types(types)
    return [name for name, m in model.named_modules()
            if isinstance(m, classes) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and any(fnmatch.fnmatch(name, p) for p in include) and not any(fnmatch.fnmatch(name, p) for p in exclude)]


def weight_reparam(module: nn.Module) -> SparseReparam | None:
    """The sparse parametrization of ``module.weight``, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, SparseReparam)), None)


def reparameterize(model: nn.Module, names: Iterable[str], make: callable) -> tuple[list[str], list[str]]:
    """Register ``make(module)`` on the weight of each named layer; skip layers already done.

    Returns (newly reparameterized names, names that already carried the same kind with the same
    settings). A layer that carries another kind of sparse parametrization, or the same kind made
    with other settings, is an error (one mechanism per layer; applying it again must not report
    settings it did not apply), raised before any layer is changed.
    """
    new, done = [], []
    for name in names:
        module = model.get_submodule(name)
        existing = weight_reparam(module)
        reparam = make(module)
        if existing is None:
            new.append((name, module, reparam))
            continue
        if type(existing) is not type(reparam):
            raise BionetsError(f"layer '{name}' already carries {type(existing).__name__}; a layer takes one "
                               f"sparse reparameterization (stds or gradr), not both")
        if differ := existing.differences(reparam):
            raise other_settings_error(existing.what, name, differ)
        done.append(name)
    _refuse_tied_weights(model, [(name, module) for name, module, _ in new], new[0][2].what if new else "")
    for name, module, reparam in new:
        reparam.to(device=module.weight.device, dtype=module.weight.dtype)
        parametrize.register_parametrization(module, "weight", reparam)
    _invalidate_spiking_reset_cache(model)
    return [name for name, _, _ in new], done


def _refuse_tied_weights(model: nn.Module, chosen: list[tuple[str, nn.Module]], what: str) -> None:
    """One error line where a chosen layer's weight is held by another module too (tied weights, as
    ``b.weight = a.weight``): the stored tensor becomes theta, so the transform that maps the weights
    to it would apply once for each holder, or the other holder would read theta as its weight. (A
    module held in two places is one module: it is reparameterized once.)"""
    holders: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), {}).setdefault(id(module), name)
    for name, module in chosen:
        others = [n for m, n in holders.get(id(module.weight), {}).items() if m != id(module)]
        if others:
            raise BionetsError(f"layers '{name}' and '{others[0]}' share one weight tensor (tied weights): {what} "
                               "cannot reparameterize it (its start would shift the weights once for each layer); "
                               f"exclude them (exclude=['{name}', '{others[0]}']) or untie the weights")


def other_settings_error(what: str, name: str, differ: list[str]) -> BionetsError:
    """The one message for a mechanism applied again with other settings (here and in
    :mod:`bionets.mechanisms.stds`)."""
    return BionetsError(f"the model's {what} layers (e.g. '{name}') were made with other settings "
                        f"({', '.join(differ)}): apply {what} to a fresh model, or with the settings it had")


def _invalidate_spiking_reset_cache(model: nn.Module) -> None:
    """SpikingJelly's ``reset_net`` caches each network's stateful modules: forget them after a change."""
    from spikingjelly.activation_based import functional

    for m in model.modules():
        functional.invalidate_reset_cache(m)


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


def no_layer_error(what: str, model: nn.Module, include, exclude, types) -> BionetsError:
    classes = _types(types)
    eligible = [n or "'' (the model itself)" for n, m in model.named_modules() if isinstance(m, classes)]
    shown = ", ".join(eligible[:6]) + (", ..." if len(eligible) > 6 else "")
    return BionetsError(f"{what} found no {'/'.join(types)} layer of {type(model).__name__} matching "
                        f"include={list(include)} exclude={list(exclude)} (eligible: {shown or 'none'})")


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


# -- sparsity accounting and export ---------------------------------------------------------------

def pruned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every layer whose weight carries a sparse parametrization."""
    return [(n, m) for n, m in model.named_modules() if weight_reparam(m) is not None]


@dataclass(frozen=True)
class Sparsity:
    """Exact zeros of the effective weights: per layer and in total (parameter-weighted)."""

    zeros: dict[str, int]
    sizes: dict[str, int]

    @property
    def total(self) -> float:
        n = sum(self.sizes.values())
        return sum(self.zeros.values()) / n if n else 0.0

    def layer(self, name: str) -> float:
        return self.zeros[name] / self.sizes[name]

    def metrics(self, prefix: str = "sparsity") -> dict[str, float]:
        """``{'sparsity': total %, 'sparsity/<layer>': layer %, ...}`` in percent."""
        out = {prefix: 100.0 * self.total}
        out.update({f"{prefix}/{n}": 100.0 * self.layer(n) for n in self.zeros})
        return out


@torch.no_grad()
def sparsity(model: nn.Module, layers: Iterable[str] | None = None) -> Sparsity:
    """Count the exact zeros of every pruned layer's effective weight, or of the conv and linear
    layers whose names match the glob patterns ``layers`` (an exported model's: its weights are plain
    again; the layers :func:`select_layers` picks)."""
    require_module(model, "sparsity")
    if layers is None:
        chosen = pruned_layers(model)
        if not chosen:
            raise BionetsError(f"sparsity: {type(model).__name__} has no STDS or Grad R layer to count (an exported "
                               "model's weights are plain again): name the layers, sparsity(model, layers=[...])")
    else:
        names = select_layers(model, include=name_list(layers, "sparsity(layers=...)"))
        if not names:
            raise no_layer_error("sparsity(layers=...)", model, list(layers), [], ("conv", "linear"))
        chosen = [(n, model.get_submodule(n)) for n in names]
    zeros, sizes = {}, {}
    for name, m in chosen:
        w = m.weight
        zeros[name] = int((w == 0).sum())
        sizes[name] = w.numel()
    return Sparsity(zeros, sizes)


def export(model: nn.Module) -> nn.Module:
    """Bake every sparse parametrization into a plain ``weight`` (the effective one, zeros included).
    Exporting a ``copy.deepcopy`` of a model leaves the model itself as it was."""
    require_module(model, "export")
    for _, m in pruned_layers(model):
        _own_parametrized_class(m)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    _invalidate_spiking_reset_cache(model)
    return model


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a parametrized class of its own. A deep copy of a parametrized module shares
    its class with the original (PyTorch's ``__deepcopy__`` keeps ``type(self)``), and removing a
    parametrization deletes its property from that class: exporting the copy would leave the
    original without its ``weight``."""
    cls = type(module)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
