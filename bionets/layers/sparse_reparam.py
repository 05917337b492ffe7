"""Sparse weight reparameterizations in general (STDS's soft threshold, Grad R's signed strength):
choosing the layers, registering a parametrization on their weights (once per layer, tied weights
refused), and reading back what they pruned.

A sparse reparameterization is a :mod:`torch.nn.utils.parametrize` parametrization of a layer's
``weight`` (a :class:`SparseReparam`), so ``layer.weight`` is the effective weight, and
:func:`export` bakes the effective weights (zeros included) into a plain model.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from bionets.errors import BionetsError, name_list, require_module, unknown

LAYER_TYPES = {"conv": nn.modules.conv._ConvNd, "linear": nn.Linear}


class SparseReparam(nn.Module):
    """Base of the weight parametrizations whose zeros count as pruned (STDS, Grad R)."""

    what = "sparse"             # the mechanism's name in messages

    def differences(self, new: SparseReparam) -> list[str]:
        """``'setting old -> new'`` for each setting in which ``new`` (of the same type, asked for
        now) differs from this one (made before); none: applying it again changes nothing."""
        return []


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


def no_layer_error(what: str, model: nn.Module, include, exclude, types) -> BionetsError:
    classes = _types(types)
    eligible = [n or "'' (the model itself)" for n, m in model.named_modules() if isinstance(m, classes)]
    shown = ", ".join(eligible[:6]) + (", ..." if len(eligible) > 6 else "")
    return BionetsError(f"{what} found no {'/'.join(types)} layer of {type(model).__name__} matching "
                        f"include={list(include)} exclude={list(exclude)} (eligible: {shown or 'none'})")


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
