"""Swapping a model's activation modules for RAA (:mod:`bionets.layers.raa`).

Each swapped module needs its feature width. It is read from the nearest preceding module that
has one (Linear, Conv, BatchNorm, LayerNorm), which is right when every activation module is
called once, after the layer registered before it. Not every model is built so: torchvision's
``Bottleneck`` applies its single ``relu`` after ``bn1`` and ``bn2`` (width w) and after the
residual sum (width 4w), and its ``SqueezeExcitation`` registers ``fc2`` before the ``relu`` that
runs after ``fc1``. Given an example input, :func:`swap_activations` runs one forward pass to see
the width of every call, and a module called at several widths becomes an :class:`RAAByWidth`:
one RAA per width, shared by the calls of that width (as they shared the module).
"""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from torch import nn

from bionets.errors import BionetsError
from bionets.layers.raa import RAA, Base, Variant
from bionets.layers.replace import replace_module

DEFAULT_TYPES = ("ReLU", "GELU", "GELUTanh", "SiLU", "Swish")


class RAAByWidth(nn.Module):
    """One :class:`RAA` per feature width, for an activation module called at several widths. The
    feature axis of a call is found as RAA finds it (dim 1 of a 4-D map, else the last dim)."""

    def __init__(self, widths: list[int], variant: Variant = "vector", base: Base = "gelu", compiled: bool = False):
        super().__init__()
        self.by_width = nn.ModuleDict({str(w): RAA(w, variant, base, compiled) for w in widths})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in (x.shape[1], x.shape[-1]) if x.ndim == 4 else (x.shape[-1],):
            if str(w) in self.by_width:
                return self.by_width[str(w)](x)
        raise BionetsError(f"RAAByWidth has RAA for widths {list(self.by_width)}, got a tensor of shape {tuple(x.shape)}: "
                           "swap again with an example input that reaches this call")


def _feature_axis(module: nn.Module) -> int | None:
    """The axis that holds the features of this layer's output, where its type decides it: the last
    (Linear, LayerNorm) or dim 1 of a 4-D map (Conv2d, BatchNorm2d); None for the others (timm's
    LayerNorm2d, say, is a LayerNorm over dim 1)."""
    if isinstance(module, nn.Linear) or type(module) is nn.LayerNorm:
        return -1
    if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
        return 1
    return None


def _width(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features", "normalized_shape", "embed_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 1:
            return int(value[0])
    return None


def call_widths(model: nn.Module, modules: dict[str, tuple[nn.Module, int]],
                example_input: torch.Tensor) -> dict[str, list[int]]:
    """The feature width of every call of each module (name -> (module, width read from the layers
    before it)) in one forward pass of ``example_input``, in eval mode and without gradients (the
    model's mode and batch-norm statistics are left as they were). A call whose tensor has the
    expected width on its dim 1 or last dim counts as that width; any other call as its dim 1
    (4-D maps) or last dim."""
    seen: dict[str, list[int]] = {name: [] for name in modules}

    def hook_for(name: str, expected: int):
        def hook(_module, args):
            x = args[0]
            axes = (x.shape[1], x.shape[-1]) if x.ndim == 4 else (x.shape[-1],)
            w = expected if expected in axes else axes[0]
            if w not in seen[name]:
                seen[name].append(w)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name, w)) for name, (m, w) in modules.items()]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except Exception as e:   # the model's own error, reported as the probe's
        raise BionetsError(f"RAA's width probe: the model failed on an input of shape {list(example_input.shape)} "
                           f"({type(e).__name__}: {e}); give an example input the model accepts") from None
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return seen


def swap_activations(model: nn.Module, *, types: tuple[str, ...] = DEFAULT_TYPES, patterns: list[str] | None = None,
                     variant: Variant = "vector", base: Base | Literal["auto"] = "auto",
                     compiled: bool = False, example_input: torch.Tensor | None = None) -> list[tuple[str, int]]:
    """Replace activation modules (by class name and name glob) with RAA, in place.

    The feature size of each activation is read from the nearest preceding module that has one
    (Linear, Conv, BatchNorm, LayerNorm); with ``example_input``, from one forward pass, and a
    module called at several widths becomes an :class:`RAAByWidth` (see the module docstring).
    ``base='auto'`` uses the ReLU form for ReLU and the GELU form for GELU and SiLU. Returns (name,
    parameters added) per replaced module; a module the model holds in several places is replaced in
    all of them by one RAA, named by all its names (``"0.2, 1.2"``). Activations applied as functions
    inside ``forward`` (e.g. ``F.relu``) are not modules and are not swapped.
    """
    wanted = {t.lower() for t in types}
    chosen: dict[str, tuple[nn.Module, int]] = {}
    axes: dict[str, int | None] = {}
    width, axis, done = None, None, set()
    for name, module in list(model.named_modules()):
        w = _width(module)
        if w is not None and not isinstance(module, RAA):
            width, axis = w, _feature_axis(module)
        if type(module).__name__.lower() not in wanted or id(module) in done:
            continue
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        if width is None:
            raise BionetsError(f"RAA cannot tell the feature size of activation '{name}' (no Linear/Conv/Norm before it)")
        chosen[name], axes[name] = (module, width), axis
        done.add(id(module))
    widths = call_widths(model, chosen, example_input) if example_input is not None and chosen else {}
    like = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    replaced = []
    for name, (module, width) in chosen.items():
        form = base if base != "auto" else ("relu" if "relu" in type(module).__name__.lower() else "gelu")
        seen = widths.get(name) or [width]
        if len(seen) == 1:      # the layer before decides the axis when the call's width is the one it gives
            raa = RAA(seen[0], variant, form, compiled, dim=axes[name] if seen[0] == width else None)
        else:
            raa = RAAByWidth(seen, variant, form, compiled)
        if like is not None:                              # the model's device and dtype
            raa.to(device=like.device, dtype=like.dtype)
        held_at = replace_module(model, module, raa)   # wherever the model holds it (one module, shared)
        replaced.append((", ".join(held_at), sum(p.numel() for p in raa.parameters())))
    return replaced
