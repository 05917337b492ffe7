"""CIFAR ResNets (He et al. 2016) and Dit-ResNets (Liu et al., NeurIPS 2024): one family.

The 3-stage CIFAR design: conv3x3 -> 16 + BN + ReLU, three stages of BasicBlocks with 16/32/64
channels (strides 1/2/2, n = 3/5/9/18 blocks for depth 20/32/56/110), projection shortcuts
(1x1 conv + BN, He's option B) where the shape changes or He's zero-padding option A, and the
Dit-CNN reference head: the final 8x8 map average-pooled to 2x2 -> 64*2*2 = 256 features -> Linear
(``head_pool=1``: He et al.'s global average pooling, 64 features). (Adaptive pooling, so 8x8 inputs
such as sklearn's digits work too.)

A Dit-ResNet is the same network with the channel-wise quadratic term in the blocks named by
``quad_blocks`` (default: the first block of stage 2, ``'layer2.0'``, as in the paper)::

    out = relu(bn1(conv1(x)))
    out = (bn2(conv2(out)) + Q(LN(out))) / 2          LN over the [H, W] map per sample and channel
    out = relu(out + shortcut(x))

``resnet{20,32,56,110}_cifar`` are the plain twins (``quad_blocks=[]``), ``dit_resnet{20,...}`` the
Dit models. The quadratic term's parameters are named ``*.quad.weight`` and its LayerNorm's
``*.quad_norm.*``: ``optim.lr_mult: {"*quad*": 10}`` selects exactly them (the paper's 10x rate).
Weights use PyTorch's default initialization, as the reference does.
"""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.nn import functional as F

from bionets.constants import CIFAR_MEAN, CIFAR_STD
from bionets.errors import BionetsError, unknown
from bionets.layers.activations import resolve_act
from bionets.layers.map_norm import MapLayerNorm
from bionets.layers.quadratic import QuadraticChannel, rename_reference_weight
from bionets.layers.quadratic_pixel import QuadraticPixel

DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}
QUAD_TYPES = ("channel", "pixel")
SHORTCUTS = ("B", "A")
DIT_PLACEMENT = ("layer2.0",)


def make_quadratic(quad_type: str, channels: int, impl: str = "sym", legacy_transpose: bool = False,
                   ablation: str = "none", pixel_kernel_size: int = 3, pixel_groups: int = 1) -> nn.Module:
    """The quadratic term of a Dit block: channel-wise (Dit-CNN) or pixel-wise (QuadraLib's product term)."""
    if quad_type == "channel":
        return QuadraticChannel(channels, impl=impl, legacy_transpose=legacy_transpose, ablation=ablation)
    if quad_type == "pixel":
        chosen = {"quad_ablation": (ablation, "none"), "quad_impl": (impl, "sym"),
                  "legacy_transpose": (legacy_transpose, False)}
        for option, (value, default) in chosen.items():
            if value != default:
                raise BionetsError(f"{option}={value!r} applies to the channel-wise term only (got quad_type='pixel')")
        return QuadraticPixel(channels, kernel_size=pixel_kernel_size, groups=pixel_groups, linear=False)
    raise unknown("quad_type", quad_type, QUAD_TYPES)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.before = stride, (planes - in_planes) // 2
        self.after = planes - in_planes - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN + shortcut, act; with ``quad`` the Dit form (module docstring).

    The activations are modules (``act1``, ``act2``), so RAA or any other swap can replace them."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B",
                 quad: nn.Module | None = None, map_size: tuple[int, int] | None = None,
                 act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if quad is not None:
            self.quad_norm = MapLayerNorm(map_size)   # LayerNorm over [H, W], per-position affine
            self.quad = quad
        else:
            self.quad_norm = self.quad = None
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        if self.quad is None:
            out = self.bn2(self.conv2(out))
        else:                        # the map's size is checked once, in ResNetCifar.forward_features
            out = (self.bn2(self.conv2(out)) + self.quad(self.quad_norm(out))) / 2
        return self.act2(out + self.shortcut(x))


def _halve(size: tuple[int, int]) -> tuple[int, int]:
    return tuple((s + 1) // 2 for s in size)   # conv3x3, padding 1, stride 2


class ResNetCifar(nn.Module):
    """The CIFAR ResNet family, plain or Dit (see the module docstring).

    Args:
        layers: blocks per stage, e.g. (3, 3, 3) for depth 20.
        num_classes, in_chans: classifier size and input channels.
        img_size: input size (int or (H, W)); the LayerNorm of a quadratic block spans its map.
        widths: channels of the three stages.
        shortcut: 'B' projection (1x1 conv + BN) where the shape changes, 'A' zero padding.
        quad_blocks: names of the blocks that get the quadratic term ('layer2.0', ...).
        quad_type: 'channel' (Dit-CNN) or 'pixel' (QuadraLib's 3x3 product term).
        quad_impl: 'sym' (folded upper triangle) or 'full' (all C^2 products).
        quad_ablation: 'none' or 'cov' (remove tr(Q Sigma); see QuadraticChannel).
        legacy_transpose: the reference CIFAR layer's spatially transposed output.
        drop_rate: dropout before the classifier.
        head_pool: the final map average-pooled to head_pool x head_pool for the classifier: 2, the
            Dit-CNN reference's head (64*2*2 = 256 features); 1, global average pooling (He et al.'s
            CIFAR ResNet and the long-tailed recipes', 64 features).
        act_layer: the activation (class or name, default ReLU).
    """

    def __init__(self, layers=(3, 3, 3), num_classes: int = 10, in_chans: int = 3, img_size=32,
                 widths=(16, 32, 64), shortcut: str = "B", quad_blocks=(), quad_type: str = "channel",
                 quad_impl: str = "sym", quad_ablation: str = "none", legacy_transpose: bool = False,
                 drop_rate: float = 0.0, act_layer="relu", head_pool: int = 2):
        super().__init__()
        act = resolve_act(act_layer)
        if shortcut not in SHORTCUTS:
            raise unknown("shortcut option", shortcut, SHORTCUTS)
        if isinstance(head_pool, bool) or not isinstance(head_pool, int) or head_pool < 1:
            raise BionetsError(f"ResNetCifar's head_pool must be an int >= 1 (2: the Dit-CNN head, 1: global average "
                               f"pooling), got {head_pool!r}")
        if len(layers) != 3 or len(widths) != 3 or min(layers) < 1:
            raise BionetsError(f"ResNetCifar needs 3 stages of >= 1 block, got layers={list(layers)} widths={list(widths)}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        names = [f"layer{s + 1}.{b}" for s, n in enumerate(layers) for b in range(n)]
        quad_blocks = [quad_blocks] if isinstance(quad_blocks, str) else quad_blocks
        for name in quad_blocks:
            if name not in names:
                raise unknown("quadratic block", name, names)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.quad_blocks = list(quad_blocks)
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = act()
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        in_planes, reduction = widths[0], 1
        for s, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if s == 0 else 2
            size, reduction = (_halve(size) if stride == 2 else size), reduction * stride
            blocks = []
            for b in range(n):
                quad = None
                if f"layer{s + 1}.{b}" in quad_blocks:
                    quad = make_quadratic(quad_type, planes, quad_impl, legacy_transpose, quad_ablation)
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1, shortcut, quad, size, act))
                in_planes = planes
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=reduction, module=f"layer{s + 1}"))
        self.num_features = in_planes            # channels of the final map (timm's convention)
        self.head_pool = head_pool
        self.head_hidden_size = in_planes * head_pool**2    # the pooled map, flattened: the classifier's input
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def check_input(self, x: torch.Tensor) -> None:
        """One clear error for an input this network was not built for (channels, or a Dit block's map size)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise BionetsError(f"{type(self).__name__} was built for in_chans={self.in_chans}, got input of shape "
                               f"{list(x.shape)}: pass in_chans={x.shape[1] if x.ndim == 4 else '?'} when creating it")
        if self.quad_blocks and tuple(x.shape[-2:]) != self.img_size:
            h, w = x.shape[-2:]
            size = f"img_size={h}" if h == w else f"img_size=({h}, {w})"
            raise BionetsError(f"{type(self).__name__} with Dit blocks was built for {self.img_size[0]}x{self.img_size[1]} "
                               f"inputs (each Dit block's LayerNorm spans its map), got {h}x{w}: pass {size} when "
                               f"creating it (in a bionets config: model.kwargs.{size.replace(' ', '')})")

    def stage_maps(self, x: torch.Tensor, last: int = 3):
        """The maps of ``feature_info`` in order (the stem's, then layer1..layer3), up to index ``last``;
        each stage's blocks recomputed in the backward under :meth:`set_grad_checkpointing`."""
        x = self.act1(self.bn1(self.conv1(x)))
        yield x
        for stage in (self.layer1, self.layer2, self.layer3)[:last]:
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and torch.is_grad_enabled() else stage(x)
            yield x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        for x in self.stage_maps(x):
            pass
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the maps of ``feature_info`` that ``indices`` selects (None: all four,
        an int n: the last n, a list: those indices), and the final map unless ``intermediates_only``.
        ``norm`` has nothing to apply (no final norm); ``stop_early`` stops after the last map taken."""
        if output_fmt != "NCHW":
            raise BionetsError(f"{type(self).__name__} gives NCHW maps only, got output_fmt={output_fmt!r}")
        take, last = feature_take_indices(len(self.feature_info), indices)
        self.check_input(x)
        intermediates = []
        for k, x in enumerate(self.stage_maps(x, last if stop_early or intermediates_only else 3)):
            if k in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last map ``indices`` takes (and the classifier with ``prune_head``);
        returns the indices kept (timm's feature API)."""
        take, last = feature_take_indices(len(self.feature_info), indices)
        for name in ("layer1", "layer2", "layer3")[last:]:
            setattr(self, name, nn.Sequential())          # empty: passes its input through
        if prune_head:
            self.reset_classifier(0)
        return take

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then each stage
        (``coarse``) or each block; the classifier comes last."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (timm's API)."""
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, self.head_pool).flatten(1)   # 2: the reference's 4x4 pooling of the 8x8 map
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_reference_state_dict(state_dict: dict) -> dict:
    """A state dict of the Dit-CNN reference CIFAR code (``CIFAR/model/dit_resnet_cifar*.py``) in
    this family's names: ``quadratic_layer.quadratic`` [C, C*C] -> ``quad.weight`` [C, C, C],
    ``ln_in`` -> ``quad_norm``, ``linear`` -> ``fc``. Load the result with
    ``legacy_transpose=True`` to reproduce the reference's trained behaviour exactly."""
    out = {}
    for key, value in state_dict.items():
        key, value = rename_reference_weight(key.removeprefix("module."), value, "quadratic_layer.quadratic",
                                             "quad.weight")
        key = key.replace(".ln_in.", ".quad_norm.")
        key = "fc." + key[len("linear."):] if key.startswith("linear.") else key
        out[key] = value
    return out


def _create(variant: str, depth: int, pretrained: bool = False, **kwargs) -> ResNetCifar:
    return build_model_with_cfg(ResNetCifar, variant, pretrained, layers=(DEPTHS[depth],) * 3,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> dict:
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0,
                interpolation="bilinear", mean=CIFAR_MEAN, std=CIFAR_STD, first_conv="conv1",
                classifier="fc", **kwargs)


default_cfgs = generate_default_cfgs({f"{p}{d}{s}": _cfg() for d in DEPTHS
                                      for p, s in (("resnet", "_cifar"), ("dit_resnet", ""))})


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-20 for CIFAR (0.27 M parameters): the plain twin of Dit-ResNet-20."""
    return _create("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _create("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _create("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _create("resnet110_cifar", 110, pretrained, **kwargs)


def _create_dit(variant: str, depth: int, pretrained: bool, kwargs: dict) -> ResNetCifar:
    kwargs.setdefault("quad_blocks", list(DIT_PLACEMENT))
    return _create(variant, depth, pretrained, **kwargs)


@register_model
def dit_resnet20(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """Dit-ResNet-20: ResNet-20 with the channel-wise quadratic term in layer2.0 (307,674 parameters)."""
    return _create_dit("dit_resnet20", 20, pretrained, kwargs)


@register_model
def dit_resnet32(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _create_dit("dit_resnet32", 32, pretrained, kwargs)


@register_model
def dit_resnet56(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _create_dit("dit_resnet56", 56, pretrained, kwargs)


@register_model
def dit_resnet110(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _create_dit("dit_resnet110", 110, pretrained, kwargs)
