"""Dit-ConvNeXt (Liu et al., NeurIPS 2024): timm's own ConvNeXt with one quadratic depthwise conv.

In the blocks named by ``quad_blocks`` (default: stage 0, block index 2, as in the paper) the
depthwise convolution becomes::

    x = dwconv(x) + Q(x)

Q the channel-wise quadratic term (:class:`~bionets.layers.quadratic.QuadraticChannel`) over the
stage's channels, on the raw block input (no norm), computed channels-last, added without
averaging; the sum goes through the block's usual norm, MLP, layer scale, drop path and residual.
Nothing else of timm's ConvNeXt changes: the network is built by timm's constructor and only that
convolution is swapped for :class:`DwConvQuadratic`, an ``nn.Conv2d`` that keeps the depthwise
weights under their timm names (``conv_dw.weight``, ``conv_dw.bias``) and adds ``conv_dw.quad``.
Variants whose stage 0 has fewer than 3 blocks get no quadratic term by default (the reference's
rule). ``quad_type='pixel'`` swaps in the pixel-wise term instead (QuadraNet's depthwise 7x7
product ``BN(W_a * x) . BN(W_b * x)``, the paper's pixel-wise rows).

Registered: ``dit_convnext_tiny`` / ``_small`` / ``_base`` and the CPU-sized ``test_dit_convnext``.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn
from torch import nn

from bionets.errors import BionetsError, unknown
from bionets.layers.quadratic import rename_reference_weight
from bionets.models.resnet_cifar import make_quadratic

DIT_PLACEMENT = ("stages.0.blocks.2",)


class DwConvQuadratic(nn.Conv2d):
    """``dwconv(x) + quad(x)``: a depthwise convolution with a quadratic term added to its output."""

    def __init__(self, conv: nn.Conv2d, quad: nn.Module):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight, self.bias = conv.weight, conv.bias
        self.quad = quad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.quad(x)


class DitConvNeXt(ConvNeXt):
    """timm's :class:`ConvNeXt` (all its arguments) with quadratic terms in ``quad_blocks``.

    Args:
        quad_blocks: block names 'stages.S.blocks.B'; ``None`` for the paper's placement
            ('stages.0.blocks.2' where stage 0 has >= 3 blocks, else none).
        quad_type: 'channel' (Dit-CNN) or 'pixel' (QuadraNet's depthwise 7x7 product term).
        quad_impl: 'sym' or 'full' (channel-wise only).
        quad_ablation: 'none' or 'cov' (channel-wise only; see QuadraticChannel).
        **kwargs: timm ConvNeXt arguments (depths, dims, drop_path_rate, in_chans, num_classes, ...).
    """

    def __init__(self, quad_blocks: list[str] | None = None, quad_type: str = "channel", quad_impl: str = "sym",
                 quad_ablation: str = "none", **kwargs):
        super().__init__(**kwargs)
        blocks = {f"stages.{s}.blocks.{b}": block for s, stage in enumerate(self.stages)
                  for b, block in enumerate(stage.blocks)}
        if quad_blocks is None:
            quad_blocks = [name for name in DIT_PLACEMENT if name in blocks]
        quad_blocks = [quad_blocks] if isinstance(quad_blocks, str) else quad_blocks
        for name in quad_blocks:
            if name not in blocks:
                raise unknown("quadratic block", name, blocks)
            conv = blocks[name].conv_dw
            if type(conv) is not nn.Conv2d or conv.stride != (1, 1):
                raise BionetsError(f"block '{name}' has a {type(conv).__name__} depthwise conv with stride "
                                   f"{conv.stride}; the quadratic term needs a plain stride-1 nn.Conv2d")
            with torch.device(conv.weight.device):
                quad = make_quadratic(quad_type, conv.in_channels, quad_impl, ablation=quad_ablation,
                                      pixel_kernel_size=conv.kernel_size[0], pixel_groups=conv.in_channels)
            blocks[name].conv_dw = DwConvQuadratic(conv, quad)
        self.quad_blocks = list(quad_blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise BionetsError(f"{type(self).__name__} was built for in_chans={self.in_chans}, got input of shape "
                               f"{list(x.shape)}: pass in_chans={x.shape[1] if x.ndim == 4 else '?'} when creating it")
        return super().forward_features(x)


def convert_reference_state_dict(state_dict: dict) -> dict:
    """A state dict of the Dit-CNN reference ImageNet code (its timm ConvNeXt with a ``quadratic``
    module beside the depthwise conv of stage 0, block 2) in this family's names:
    ``blocks.B.quadratic.quadratic`` [C, C*C] -> ``blocks.B.conv_dw.quad.weight`` [C, C, C]. The
    reference's term reads channels-last pixels, ``sum_k W[o, k] (x x^T)_k`` with ``k = i*C + j``,
    which is ``sum_ij Q[o, i, j] x_i x_j`` for that reshape: the model computes what it computed."""
    out = {}
    for key, value in state_dict.items():
        key, value = rename_reference_weight(key.removeprefix("module."), value, ".quadratic.quadratic",
                                             ".conv_dw.quad.weight")
        out[key] = value
    return out


def filter_checkpoint(state_dict: dict, model: DitConvNeXt) -> dict:
    """timm's ConvNeXt checkpoint filter (Facebook's names to timm's) and the reference's names (see
    :func:`convert_reference_state_dict`), then the quadratic terms that a plain ConvNeXt's checkpoint
    lacks, at the model's own initial values (either term starts at zero: the net starts as the
    ConvNeXt it was loaded from), so that ``pretrained=True`` with a timm ConvNeXt's or the
    reference's weights as ``pretrained_cfg_overlay=dict(file=...)`` starts a Dit-ConvNeXt from them."""
    state_dict = checkpoint_filter_fn(convert_reference_state_dict(state_dict), model)
    own = {k: v for k, v in model.state_dict().items() if ".conv_dw.quad." in k and k not in state_dict}
    return {**state_dict, **own}


def _create(variant: str, pretrained: bool = False, **kwargs) -> DitConvNeXt:
    return build_model_with_cfg(DitConvNeXt, variant, pretrained, pretrained_filter_fn=filter_checkpoint,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.95,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "stem.0", "classifier": "head.fc", **kwargs}


default_cfgs = generate_default_cfgs({
    "dit_convnext_tiny": _cfg(), "dit_convnext_small": _cfg(), "dit_convnext_base": _cfg(),
    "test_dit_convnext": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def dit_convnext_tiny(pretrained: bool = False, **kwargs) -> DitConvNeXt:
    """Dit-ConvNeXt-T: 29,473,864 parameters (convnext_tiny 28,589,128 + 96^3)."""
    return _create("dit_convnext_tiny", pretrained, **dict(dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), **kwargs))


@register_model
def dit_convnext_small(pretrained: bool = False, **kwargs) -> DitConvNeXt:
    """Dit-ConvNeXt-S: 51,108,424 parameters (convnext_small 50,223,688 + 96^3)."""
    return _create("dit_convnext_small", pretrained, **dict(dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), **kwargs))


@register_model
def dit_convnext_base(pretrained: bool = False, **kwargs) -> DitConvNeXt:
    """Dit-ConvNeXt-B: 90,688,616 parameters (convnext_base 88,591,464 + 128^3)."""
    return _create("dit_convnext_base", pretrained, **dict(dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), **kwargs))


@register_model
def test_dit_convnext(pretrained: bool = False, **kwargs) -> DitConvNeXt:
    """A tiny Dit-ConvNeXt for CPU tests: stage 0 has the 3 blocks the default placement needs."""
    return _create("test_dit_convnext", pretrained, **dict(dict(depths=(3, 1, 1, 1), dims=(16, 24, 32, 48)), **kwargs))
