"""Mechanism ``quadratic``: put Dit-CNN's channel-wise quadratic term beside chosen convolutions.

A chosen ``Conv2d`` becomes ``y = conv(x) + Q(x)`` (the Dit-ConvNeXt block's form, SPEC-DIT; ``auto``
places it on the first eligible convolution, not on the paper's stage-0 block 2), where
``Q(x)_o(p) = sum_ij Q[o, i, j] x_i(p) x_j(p)`` is computed at every output pixel p from the raw
block input (no norm) and Q starts at zero, so the converted model starts as the original one.
For a strided convolution Q is evaluated at the input pixels the kernel is centred on
(``x[..., ::s, ::s]``), so its output lands on the conv's output grid.

Options (``mechanisms: {quadratic: {...}}`` or ``bionets.convert(model, quadratic=...)``):
``placement``: glob patterns of Conv2d module names (a convolution whose output grid Q cannot
match, such as a 4x4 stride-4 stem, is left out with a note; named alone, it is an error), or
``auto``: the first convolution with stride 1, "same" padding and as many output as input
channels, after the stem (ResNet:
``layer1.0.conv1``; ConvNeXt: the first depthwise conv; EfficientNet: the first depthwise conv).
``impl``: ``sym`` (the C(C+1)/2 distinct products) or ``full`` (all C^2, the reference form).
The quadratic parameters are named ``*.quad.*`` so ``optim.lr_mult: {"*quad*": 10}`` selects them.
"""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from torch import nn

from bionets.configbase import Section
from bionets.errors import BionetsError
from bionets.layers.quadratic import QuadraticChannel
from bionets.layers.replace import replace_module
from bionets.mechanisms.registry import Applied, Report, register_mechanism


class QuadraticConfig(Section):
    placement: list[str] | Literal["auto"] = "auto"
    impl: Literal["sym", "full"] = "sym"


class ConvPlusQuadratic(nn.Module):
    """``conv(x) + Q(x)``: a convolution with Dit's channel-wise quadratic term added."""

    def __init__(self, conv: nn.Conv2d, impl: str = "sym"):
        super().__init__()
        self.conv = conv
        self.stride = conv.stride[0]
        self.quad = QuadraticChannel(conv.in_channels, conv.out_channels, impl=impl)
        self.quad.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.stride > 1:
            x = x[..., ::self.stride, ::self.stride]
        # SpikingJelly's multi-step conv takes [T, N, C, H, W]: Q folds the time steps into the batch
        q = self.quad(x.flatten(0, 1)).unflatten(0, x.shape[:2]) if x.ndim == 5 else self.quad(x)
        return y + q[..., :y.shape[-2], :y.shape[-1]]


def _ineligible(conv: nn.Conv2d) -> str | None:
    """Why Q cannot match ``conv``'s output grid, or None: Q is taken at the input pixel each kernel
    window is centred on (``x[..., ::s, ::s]``), so the window needs a centre pixel (an odd extent
    dilation x (kernel - 1) + 1), padding that puts it on the output pixel ("same": half the rest),
    and one stride for both axes."""
    pads = conv.padding if not isinstance(conv.padding, str) else (
        (0, 0) if conv.padding == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation)))
    spans = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if any(span % 2 for span in spans) or any(2 * p != span for p, span in zip(pads, spans)) or \
            conv.stride[0] != conv.stride[1]:
        return (f"kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding {conv.padding}: Q needs "
                "an odd kernel, padding (kernel - 1) / 2 x dilation and one stride for both axes")
    return None


def eligible_convs(model: nn.Module) -> list[str]:
    """Names of plain Conv2d layers (not already converted) whose output grid Q can match."""
    return [n for n, m in _plain_convs(model) if _ineligible(m) is None]


def _plain_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The Conv2d layers without a quadratic term (not wrapped here, and not a Dit-ConvNeXt's own
    ``DwConvQuadratic``, a convolution that carries one)."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, ConvPlusQuadratic)}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.rpartition(".")[0] not in wrapped
            and not isinstance(getattr(m, "quad", None), nn.Module)]


def _carrying_a_term(model: nn.Module) -> list[str]:
    """The modules that hold a quadratic term as their ``quad``: this mechanism's wrappers, and the Dit
    models' own blocks and convolutions (a second term beside theirs was added silently)."""
    return [n.rpartition(".")[0] for n, _ in model.named_modules() if n.rpartition(".")[2] == "quad"]


def _auto(model: nn.Module, names: list[str]) -> list[str]:
    modules = dict(model.named_modules())
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    for n in names:
        m = modules[n]
        if n != first_conv and m.stride[0] == 1 and m.in_channels == m.out_channels:
            return [n]
    return []


# terms that would outweigh the model this many times, and add this many parameters, are refused before
# they are made: placement ['*'] on Dit-ConvNeXt-T asked for 1.9 G parameters (7.6 GB), and allocating
# them ran for minutes before the note on their size could be read
OVERSIZED_RATIO, OVERSIZED_PARAMS = 10, 100_000_000


def _refuse_oversized(model: nn.Module, chosen: list[str], impl: str) -> None:
    """One error line, before any term is made, where the chosen terms would add more than
    ``OVERSIZED_PARAMS`` parameters and ``OVERSIZED_RATIO`` times the model's own (each counted on the
    meta device, without memory)."""
    with torch.device("meta"):
        sizes = {n: sum(p.numel() for p in QuadraticChannel(c.in_channels, c.out_channels, impl=impl).parameters())
                 for n, c in ((n, model.get_submodule(n)) for n in chosen)}
    added, own = sum(sizes.values()), sum(p.numel() for p in model.parameters())
    if added > OVERSIZED_PARAMS and added > OVERSIZED_RATIO * own:
        widest = max(sizes, key=sizes.get)
        raise BionetsError(f"quadratic placement would add {added:,} parameters ({added * 4 / 2**30:.1f} GiB in "
                           f"float32) to the model's {own:,} in {len(sizes)} term(s), '{widest}' the largest "
                           f"({sizes[widest]:,}): a term grows with the cube of the channels; name narrower "
                           "convolutions in placement")


@register_mechanism("quadratic", QuadraticConfig, order=10)
def apply_quadratic(model: nn.Module, cfg: QuadraticConfig) -> Applied:
    report = Report("quadratic")
    done = _carrying_a_term(model)
    candidates = eligible_convs(model)
    if cfg.placement == "auto":
        chosen = [] if done else _auto(model, candidates)
        if not chosen and not done and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise BionetsError(f"quadratic placement 'auto' found no 2-D convolution in {type(model).__name__}: the "
                               "channel-wise quadratic term goes beside a convolution of a CNN; for a quadratic neuron "
                               "on vectors, build the model with bionets.layers.quadratic.QuadraticNeuron")
        if not chosen and not done:
            raise BionetsError(f"quadratic placement 'auto' found no stride-1 convolution with equal input and "
                               f"output channels in {type(model).__name__} after its stem (its first convolution, "
                               "which 'auto' leaves alone): name layers with placement=[...]")
    else:
        named = [(n, _ineligible(m)) for n, m in _plain_convs(model)
                 if any(fnmatch.fnmatch(n, p) for p in cfg.placement)]
        chosen = [n for n, why in named if why is None]
        unfit = [(n, why) for n, why in named if why is not None]
        already = [n for n in done if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(n + ".conv", p) for p in cfg.placement)]
        shown = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
        if not chosen and not already and unfit:
            raise BionetsError(f"quadratic placement {cfg.placement} names convolution '{unfit[0][0]}' of "
                               f"{type(model).__name__}, whose output grid Q cannot match ({unfit[0][1]}): name one "
                               f"that fits (eligible: {shown or 'none'})")
        if not chosen and not already:
            raise BionetsError(f"quadratic placement {cfg.placement} matches no convolution of "
                               f"{type(model).__name__} (eligible: {shown or 'none'})")
        if unfit:
            report.notes.append(f"left as they are, {len(unfit)} convolution(s) the placement matches whose output "
                                f"grid Q cannot match: '{unfit[0][0]}' ({unfit[0][1]})"
                                + (", ..." if len(unfit) > 1 else ""))
    _refuse_oversized(model, chosen, cfg.impl)
    for name in chosen:
        conv = model.get_submodule(name)
        wrapper = ConvPlusQuadratic(conv, cfg.impl)
        held_at = replace_module(model, conv, wrapper)   # every place that holds it: a shared conv stays shared
        added = sum(p.numel() for p in wrapper.quad.parameters())
        report.changes.append(f"{', '.join(held_at)}: conv + channel-wise quadratic term ({wrapper.conv.in_channels} -> "
                              f"{wrapper.conv.out_channels} channels, +{added:,})")
        report.params_added += added
    own = sum(p.numel() for p in model.parameters()) - report.params_added
    if report.params_added > own / 10:      # (C x C x C weights a convolution: cubic in the width)
        report.notes.append(f"the quadratic term(s) add {report.params_added:,} parameters to the model's {own:,} "
                            f"({100 * report.params_added / max(own, 1):.0f}%): its size grows with the cube of the "
                            "channels; name a narrower convolution in placement to add fewer")
    if done and not chosen:
        report.notes.append(f"the model carries {len(done)} quadratic term(s) already: left as they are, with their "
                            "own settings")
    elif done:
        inside = [n for n in chosen if any(n.startswith(d + ".") for d in done if d)]
        report.notes.append(f"the model carries {len(done)} quadratic term(s) already ({', '.join(done[:3])}"
                            f"{', ...' if len(done) > 3 else ''}): the new ones are added beside them"
                            + (f", {len(inside)} inside a module that has one ('{inside[0]}')" if inside else ""))
    return Applied(model, [], report)
