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
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bionets.errors import BionetsError, name_list, one_line, require_module
from bionets.layers.raa import RAA, Base, Variant
from bionets.layers.replace import replace_module

DEFAULT_TYPES = ("ReLU", "GELU", "GELUTanh", "SiLU", "Swish")


class ProbeError(BionetsError):
    """The model failed on the example input of the width probe (``cause``: its error, one line)."""

    def __init__(self, shape: list[int], error: Exception):
        self.cause = one_line(error, 160)
        super().__init__(f"RAA's width probe: the model failed on an input of shape {shape} ({self.cause}); "
                         "give an example input the model accepts")


class RAAByWidth(nn.Module):
    """One :class:`RAA` per feature width, for an activation module called at several widths. The
    feature axis of a call is found as RAA finds it (dim 1 of a 4-D or 5-D map, the last dim of a
    3-D tensor, else the other)."""

    def __init__(self, widths: list[int], variant: Variant = "vector", base: Base = "gelu", compiled: bool = False):
        super().__init__()
        if not widths:
            raise BionetsError("RAAByWidth needs one or more widths, got none: give the feature widths it is called at")
        self.by_width = nn.ModuleDict({str(w): RAA(w, variant, base, compiled) for w in widths})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in (x.shape[1], x.shape[-1]) if x.ndim >= 4 else (x.shape[-1], x.shape[1]) if x.ndim == 3 \
                else (x.shape[-1],) if x.ndim else ():
            if str(w) in self.by_width:
                return self.by_width[str(w)](x)
        raise BionetsError(f"RAAByWidth has RAA for widths {list(self.by_width)}, got a tensor of shape {tuple(x.shape)}: "
                           "swap again with an example input that reaches this call")


def _feature_axis(module: nn.Module) -> int | None:
    """The axis that holds the features of this layer's output, where its type decides it: the last
    (Linear, LayerNorm) or dim 1 (convolutions of 1, 2 or 3 spatial dims, BatchNorm2d and 3d); None
    for the others (timm's LayerNorm2d, say, is a LayerNorm over dim 1; LeViT runs BatchNorm1d on
    tokens flattened to [N L, C], whose activation then sees [N, L, C]: RAA then finds the axis
    per call)."""
    if isinstance(module, nn.Linear) or type(module) is nn.LayerNorm:
        return -1
    if isinstance(module, nn.modules.conv._ConvNd | nn.BatchNorm2d | nn.BatchNorm3d):
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


@dataclass
class Activation:
    """An activation module to swap, the width read from the layers registered before it, and the
    axis that layer's type puts its features on (None: unknown)."""

    module: nn.Module
    width: int
    axis: int | None


@dataclass
class Probe:
    """What one forward pass saw: the width of every call of each chosen module (and the feature
    axes its calls showed unambiguously), the activation functions called in a ``forward`` outside
    any activation module (``F.relu``, which no swap reaches), counted as ``'relu (in
    DenseNet.forward)'``, and the modules of other types without children or parameters that call
    one, as ``{'GELUActivation': 12}`` (modules)."""

    widths: dict[str, list[int]]
    axes: dict[str, set[int]] = field(default_factory=dict)
    functions: Counter = field(default_factory=Counter)
    activation_like: Counter = field(default_factory=Counter)


ACTIVATION_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.gelu,
                        F.silu}


def _is_activation_module(module: nn.Module) -> bool:
    return isinstance(module, RAA | RAAByWidth) or type(module).__module__.startswith(
        ("torch.nn.modules.activation", "timm.layers.activations"))


class _FunctionCalls(TorchFunctionMode):
    """Sorts the activation functions called during a forward pass by the innermost running module
    (the top of ``stack``): none where it is an activation module or one of ``chosen``; by type
    where it is another module without children or parameters (an activation of a type not asked
    for, likely); else as a function called in that module's ``forward``."""

    def __init__(self, stack: list[nn.Module], chosen: set[int]):
        super().__init__()
        self.stack, self.chosen, self.counts, self.leaves = stack, chosen, Counter(), {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ACTIVATION_FUNCTIONS:
            top = self.stack[-1] if self.stack else None
            if top is None:
                self.counts[f"{func.__name__} (in the caller)"] += 1
            elif not (_is_activation_module(top) or id(top) in self.chosen):
                if next(top.children(), None) is None and next(top.parameters(), None) is None:
                    self.leaves.setdefault(type(top).__name__, set()).add(id(top))
                else:
                    self.counts[f"{func.__name__} (in {type(top).__name__}.forward)"] += 1
        return func(*args, **(kwargs or {}))


def _call_width(x: torch.Tensor, expected: int) -> tuple[int, int | None]:
    """(width, feature axis) of one call: ``expected`` (the layers' width) where dim 1 or the last
    dim of a 3-D to 5-D tensor has it (axis None where both do: an NHWC map whose height is its
    width); else, on a 4-D or 5-D map, the axis its square spatial dims point to (the probe's input
    is square: the last two dims equal where the features are on dim 1, not where they are last);
    else the last dim (tokens, vectors)."""
    if x.ndim < 3:
        return x.shape[-1], -1
    sizes = (x.shape[1], x.shape[-1])
    if expected in sizes:
        return expected, None if sizes.count(expected) == 2 else 1 if sizes[0] == expected else -1
    channels_first = x.ndim > 3 and x.shape[-2] == x.shape[-1] and x.shape[1] != x.shape[-1]
    return (x.shape[1], 1) if channels_first else (x.shape[-1], -1)


def _reset_neurons(model: nn.Module) -> None:
    """SpikingJelly's neurons keep their state after a forward pass: drop the probe's. (Not
    ``functional.reset_net``: it calls any module's ``reset()``, with a warning for those that are no
    neuron, and caches the module list, which the swap that follows changes.)"""
    if "spikingjelly" in sys.modules:
        from spikingjelly.activation_based.base import MemoryModule
        for m in model.modules():
            if isinstance(m, MemoryModule):
                m.reset()


def _type_name(t) -> str:
    if isinstance(t, type):
        return t.__name__
    if not isinstance(t, str):
        raise BionetsError(f"RAA's types are activation classes or their names ('ReLU', nn.GELU), got {t!r} "
                           f"({type(t).__name__}): give a class or its name")
    return t


def find_activations(model: nn.Module, types: tuple[str, ...] = DEFAULT_TYPES,
                     patterns: list[str] | None = None) -> dict[str, Activation]:
    """The activation modules of ``types`` (class names, or the classes) whose names match
    ``patterns`` (globs), by name (a module held in several places: its first name), with the width
    read from the nearest module registered before each that has one (Linear, Conv, BatchNorm,
    LayerNorm)."""
    require_module(model, "find_activations")
    wanted = {_type_name(t).lower() for t in name_list(types, "types")}
    patterns = name_list(patterns, "patterns") if patterns is not None else None
    chosen: dict[str, Activation] = {}
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
        chosen[name] = Activation(module, width, axis)
        done.add(id(module))
    return chosen


def probe_activations(model: nn.Module, chosen: dict[str, Activation], example_input: torch.Tensor) -> Probe:
    """One forward pass of ``example_input``, in eval mode and without gradients, that sees the
    feature width and axis of every call of each chosen module (:func:`_call_width`) and the
    activation functions called outside activation modules. Every module's mode, the batch-norm
    statistics and SpikingJelly's neuron states are left as they were."""
    seen: dict[str, list[int]] = {name: [] for name in chosen}
    axes: dict[str, set[int]] = {name: set() for name in chosen}
    stack: list[nn.Module] = []

    def width_hook(name: str, expected: int):
        def hook(_module, args):
            w, axis = _call_width(args[0], expected)
            if w not in seen[name]:
                seen[name].append(w)
            if axis is not None:
                axes[name].add(axis)
        return hook

    def enter(module, _args) -> None:
        stack.append(module)

    def leave(_module, _args, _out) -> None:    # (a hook that returns something replaces the output)
        stack.pop()

    handles = [a.module.register_forward_pre_hook(width_hook(name, a.width)) for name, a in chosen.items()]
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):      # (which take no hooks)
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    modes, calls = {m: m.training for m in model.modules()}, _FunctionCalls(stack, {id(a.module) for a in chosen.values()})
    try:
        model.eval()
        with torch.no_grad(), calls:
            eager(model)(example_input)
    except Exception as e:   # the model's own error, reported as the probe's
        raise ProbeError(list(example_input.shape), e) from None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        _reset_neurons(model)
    return Probe(seen, axes, calls.counts, Counter({t: len(ids) for t, ids in calls.leaves.items()}))


def eager(model: nn.Module) -> nn.Module:
    """The model a ``torch.compile`` wrapper holds (whose tracing of the probe's hooks failed), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def raa_form(module: nn.Module, base: Base | Literal["auto"]) -> Base:
    """The RAA form that replaces ``module``: ``base``, or under ``auto`` the ReLU form for a ReLU
    (by class name), else the GELU form (SiLU too)."""
    return base if base != "auto" else ("relu" if "relu" in type(module).__name__.lower() else "gelu")


def replace_activations(model: nn.Module, chosen: dict[str, Activation], probe: Probe | None = None,
                        variant: Variant = "vector", base: Base | Literal["auto"] = "auto",
                        compiled: bool = False) -> list[tuple[str, int]]:
    """Replace each chosen module by an RAA of its width (with a probe, of the widths its calls
    showed: one, an RAA on the axis they showed; several, an :class:`RAAByWidth`) on the model's
    device and in its dtype, wherever the model holds it. Returns (names, parameters added) per module."""
    like = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    replaced = []
    for name, a in chosen.items():
        form = raa_form(a.module, base)
        seen = probe.widths.get(name) if probe else None
        shown = probe.axes.get(name, set()) if probe else set()
        if not seen or len(seen) == 1:
            # the axis the calls showed, else the one the layer before gives where its width is the call's
            w = seen[0] if seen else a.width
            dim = next(iter(shown)) if len(shown) == 1 else a.axis if w == a.width else None
            raa = RAA(w, variant, form, compiled, dim=dim)
        else:
            raa = RAAByWidth(seen, variant, form, compiled)
        if like is not None:
            raa.to(device=like.device, dtype=like.dtype)
        held_at = replace_module(model, a.module, raa)   # wherever the model holds it (one module, shared)
        replaced.append((", ".join(held_at), sum(p.numel() for p in raa.parameters())))
    return replaced


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
    inside ``forward`` (e.g. ``F.relu``) are not modules and are not swapped (the probe of
    :func:`probe_activations` counts them).
    """
    require_module(model, "swap_activations")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise BionetsError(f"swap_activations' example_input takes one input tensor of the model, got "
                           f"{type(example_input).__name__}: convert it (torch.as_tensor)")
    chosen = find_activations(model, types, patterns)
    probe = probe_activations(model, chosen, example_input) if example_input is not None and chosen else None
    return replace_activations(model, chosen, probe, variant, base, compiled)
