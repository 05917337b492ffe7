"""Mechanism ``raa``: DNRT's Response-Adaptive Activation on any timm/torchvision model.

``mechanisms: {raa: {variant: vector, types: [ReLU, GELU, GELUTanh, SiLU, Swish], patterns: null}}`` swaps the
activations for RAA (:mod:`bionets.layers.raa`); ``input_size: [C, H, W]`` finds the width of
every activation call by one forward pass on zeros (:mod:`bionets.layers.raa_swap`): ``auto`` (the
default) at the size the model states (timm's ``pretrained_cfg``, torchvision's 224 x 224), falling
back to the widths read from the layers where the model states none or fails on it; ``null`` reads
them from the layers only.
"""
from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from bionets.configbase import Section
from bionets.errors import BionetsError, one_line
from bionets.layers.raa_swap import (DEFAULT_TYPES, Probe, ProbeError, eager, find_activations, probe_activations,
                                     raa_form, replace_activations)
from bionets.mechanisms.registry import Applied, Report, SgdRateNote, register_mechanism


Size = Annotated[int, Field(strict=True, gt=0)]      # (strict: true is no size)


class RaaConfig(Section):
    variant: Literal["vector", "scalar", "matrix"] = "vector"
    base: Literal["auto", "gelu", "relu"] = "auto"
    types: list[str] = list(DEFAULT_TYPES)
    patterns: list[str] | None = None
    compiled: bool = False        # fuse the whole RAA (shift and activation) with torch.compile: the fast path
    # [C, H, W] of one input: find every activation call's width by a forward pass on zeros; auto: at the
    # size the model states (stated_input_size), else from the layers; null: from the layers only
    input_size: Annotated[list[Size], Field(min_length=1)] | Literal["auto"] | None = "auto"


# measured: resnet20_cifar with RAA on the digits, SGD lr 0.1: test loss 1e5 after the first epoch,
# then chance for all 30 epochs; 98.6% with v's multiplier and a 1-epoch warm-up (tests/test_convert.py
# trains with both multipliers). Without a warm-up (recipe_cnn_cifar), 10 epochs, ReLU form: 14.2 / 21.7%
# (seeds 0 / 1) with v's alone, 76.1 / 96.7% with c's too (the plain ReLU net: 58.6 / 59.2%).
V_RATES = {"*.vc": 0.01, "*.c": 0.01}
V_LR_NOTE = SgdRateNote("v and c sum their gradients over every pixel or token (c over the features too): with SGD "
                        "at lr ~0.1 train them with optim.lr_mult: {'*.vc': 0.01, '*.c': 0.01} (bionets train sets "
                        "it under SGD) or training can diverge; AdamW needs none", tuple(V_RATES))


def shift_rates(cfg: RaaConfig) -> dict[str, float]:
    """The lr multipliers a run under SGD gives RAA's shift (V_LR_NOTE: without them ResNet-20 on the
    digits fell to chance); the matrix variant's c is per feature, as a norm's bias, and takes none."""
    return {} if cfg.variant == "matrix" else dict(V_RATES)


# (v and c are one parameter, vc = [v | c], since 2026-11-29: they share one rate)
@register_mechanism("raa", RaaConfig, order=20, sgd_lr_mult=shift_rates, renamed={".v": ".vc"})
def apply_raa(model: nn.Module, cfg: RaaConfig) -> Applied:
    from bionets.layers.raa import RAA

    already = sum(isinstance(m, RAA) for m in model.modules())
    if isinstance(cfg.input_size, list) and len(cfg.input_size) != 3 and any(
            isinstance(m, nn.Conv2d) for m in model.modules()):
        raise BionetsError(f"raa input_size {cfg.input_size}: {type(model).__name__} has 2-D convolutions, which take "
                           f"one input as [C, H, W] (3 numbers), e.g. [3, 32, 32]")
    chosen = find_activations(model, tuple(cfg.types), cfg.patterns)
    size = stated_input_size(model) if cfg.input_size == "auto" else cfg.input_size
    probe, notes = Probe({}), []
    try:
        probe = probe_activations(model, chosen, _zeros(model, size)) if size else probe
    except ProbeError as err:
        if cfg.input_size != "auto":
            raise
        notes.append(f"widths read from the layers: the width probe at the model's stated input size {size} failed "
                     f"({err.cause}); if one activation module runs at several widths, give input_size: [C, H, W]")
    if cfg.input_size == "auto" and size is None and chosen:
        notes.append(f"widths read from the layers: {type(model).__name__} states no input size; if one activation "
                     "module runs at several widths, give input_size: [C, H, W]")
    functions = ", ".join(f"{call} x{n}" for call, n in probe.functions.most_common())
    # torch's and timm's activations of other types, and modules of other types that call one
    others = ", ".join(filter(None, [other_activations(model, cfg.types),
                                     ", ".join(f"{t} x{n}" for t, n in probe.activation_like.most_common())]))
    if not chosen and not already:
        typed = [n for n, m in model.named_modules() if type(m).__name__.lower() in {t.lower() for t in cfg.types}]
        shown = ", ".join(typed[:4]) + (", ..." if len(typed) > 4 else "")
        spiking = Counter(type(m).__name__ for m in model.modules()
                          if type(m).__module__.startswith("spikingjelly.activation_based.neuron"))
        hint = (f": the patterns match none of its {len(typed)} activation module(s) of these types ({shown})"
                if cfg.patterns and typed else
                f"; its neurons are spiking ({', '.join(f'{t} x{n}' for t, n in spiking.most_common())}): RAA is the "
                "activation of a network of rates, not a spiking neuron" if spiking else
                f"; it has {others}: to swap them, add their class names to types" if others else
                f"; its forward calls {functions}: functions, not modules, which RAA cannot swap" if functions else
                " (activations called as functions in forward, such as F.relu, are no modules to swap)")
        raise BionetsError(f"raa found no activation module of types {list(cfg.types)}"
                           + (f" matching {cfg.patterns}" if cfg.patterns else "") + f" in {type(model).__name__}{hint}")
    # base auto gives every activation other than a ReLU the GELU form: a SiLU's RAA starts as GELU
    recast = Counter(type(a.module).__name__ for a in chosen.values()
                     if cfg.base == "auto" and raa_form(a.module, "auto") not in type(a.module).__name__.lower())
    replaced = replace_activations(model, chosen, probe, cfg.variant, cfg.base, cfg.compiled)
    if cfg.variant != "matrix" and replaced:
        notes.insert(0, V_LR_NOTE)
    if recast:
        notes.append(", ".join(f"{t} x{n}" for t, n in recast.most_common()) + ": RAA of the GELU form, "
                     "x * Phi(x + shift), which starts as GELU, not as the activation it replaced")
    if replaced and others:
        notes.append(f"left as they are: {others} (to swap them too, add their class names to types)")
    if functions:
        notes.append(f"left as they are: activations called as functions, {functions} (no module to swap)")
    if already and not replaced:
        notes.append(f"the model carries {already} RAA module(s) already: left as they are, with their own settings")
    report = Report("raa", [f"{name}: -> RAA ({cfg.variant}), +{n}" for name, n in replaced],
                    sum(n for _, n in replaced), notes)
    return Applied(model, [], report)


def stated_input_size(model: nn.Module) -> list[int] | None:
    """[C, H, W] of one input as the model states it, or None: timm's ``pretrained_cfg`` input size
    read as the model was built (timm keeps the registered config when ``img_size`` or ``in_chans``
    change): the channels of its ``in_chans`` (else of its first convolution), the height and width
    of the first module with an ``img_size`` (the model's own, a patch embedding's; timm's LeViT:
    its first attention's ``resolution`` times its stem's stride); torchvision's
    classifiers, segmentation and detection models: 3 x 224 x 224 (a ViT's own ``image_size``).
    A wrapper states what the model it calls states (DataParallel's and DDP's ``module``,
    torch.compile's ``_orig_mod``, a Sequential's first module)."""
    inner = _called_model(model)
    if inner is not None:
        return stated_input_size(inner)
    stated = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    module = type(model).__module__.split(".")
    if stated is None and module[:2] == ["torchvision", "models"] and (
            len(module) == 3 or module[2] in ("segmentation", "detection")):
        stated = (3, getattr(model, "image_size", 224), getattr(model, "image_size", 224))
    if stated is None or len(stated) != 3:
        return None
    channels = getattr(model, "in_chans", None)
    if not isinstance(channels, int):
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else stated[0]
    hw = list(stated[1:])
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, int) or isinstance(size, tuple | list) and len(size) == 2:
            hw = [size, size] if isinstance(size, int) else list(size)
            break
    else:
        stride = getattr(getattr(model, "stem", None), "stride", None)
        if type(model).__module__ == "timm.models.levit" and isinstance(stride, int):
            # LeViT keeps no img_size: its attention's token grid (fixed by its biases) times its stem's stride
            grid = next((m.resolution for m in model.modules() if isinstance(getattr(m, "resolution", None), tuple)),
                        None)
            hw = [r * stride for r in grid] if grid is not None else hw
    return [channels, *hw]


def _called_model(model: nn.Module) -> nn.Module | None:
    """The model a wrapper calls on the wrapper's own input, or None for a model that is no wrapper."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return model.module
    if eager(model) is not model:             # torch.compile's
        return eager(model)
    return model[0] if isinstance(model, nn.Sequential) and len(model) else None


def _zeros(model: nn.Module, size: list[int]) -> torch.Tensor:
    """A batch of two zero inputs of ``size``, on the model's device (in its dtype if floating)."""
    p = next(model.parameters(), None)
    try:
        return torch.zeros(2, *size, device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None and p.is_floating_point() else None)
    except RuntimeError as err:     # more memory than there is
        raise BionetsError(f"RAA's width probe cannot make an input of shape {[2, *size]} ({one_line(err, 120)}): give "
                           "a smaller input_size (the widths do not depend on the image size of a CNN)") from None


# torch's and timm's modules there that are gates, normalizers or layers, not a neuron's activation
_NOT_ACTIVATIONS = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "Identity", "Sigmoid",
                    "Hardsigmoid", "HardSigmoid", "LogSigmoid", "Tanh", "GLU", "Threshold", "GateMlp"}


def other_activations(model: nn.Module, types: list[str]) -> str:
    """The activation modules (torch's and timm's) of other types than ``types`` in ``model``, as
    'Hardswish x19, ReLU6 x2'; '' if none."""
    wanted = {t.lower() for t in types}
    counts = Counter(type(m).__name__ for m in model.modules()
                     if type(m).__module__.startswith(("torch.nn.modules.activation", "timm.layers.activations"))
                     and type(m).__name__ not in _NOT_ACTIVATIONS and type(m).__name__.lower() not in wanted)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())
