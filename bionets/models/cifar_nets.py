"""CIFAR-style ResNet-18 and VGG-11 (the DNRT paper's CNN rows), registered with timm.

``resnet18_cifar`` is timm's own ResNet-18 with the usual CIFAR stem (a 3x3 stride-1 conv, no
max-pool) swapped in; ``vgg11_cifar`` is VGG-11 with BatchNorm for 32x32 inputs (512 features
after five 2x2 pools, one linear classifier). ``act_layer`` selects the activation (a timm name
or a torch.nn class name such as ``softplus``) for the activation comparisons. Both are built by
timm's ``build_model_with_cfg``: ``pretrained=True`` loads a file given as
``pretrained_cfg_overlay=dict(file=...)``, and ``resnet18_cifar`` takes ``features_only=True``.
"""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from bionets.constants import CIFAR_MEAN, CIFAR_STD
from bionets.layers.activations import resolve_act

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def classifier(features: int, num_classes: int) -> nn.Module:
    """The linear classifier, or for ``num_classes=0`` none (the model gives its pooled features), as timm's."""
    return nn.Linear(features, num_classes) if num_classes > 0 else nn.Identity()


class VGGCifar(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, act_layer="relu"):
        super().__init__()
        act = resolve_act(act_layer)
        layers, c, self.feature_info = [], in_chans, []
        for v in VGG11:
            if v == "M":        # (timm's feature maps: each activation before a pool)
                self.feature_info.append(dict(num_chs=c, reduction=2 ** len(self.feature_info),
                                              module=f"features.{len(layers) - 1}"))
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), act()]
                c = v
        self.features = nn.Sequential(*layers)
        self.num_classes, self.num_features = num_classes, 512
        self.fc = classifier(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes, self.fc = num_classes, classifier(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ResNetCifarStem(ResNet):
    """timm's :class:`ResNet` (all its arguments) with the CIFAR stem: a 3x3 stride-1 conv and no
    max-pool, so layer1 runs at the input's size (``feature_info`` gives those reductions)."""

    def __init__(self, *args, in_chans: int = 3, **kwargs):
        super().__init__(*args, in_chans=in_chans, **kwargs)
        self.conv1 = nn.Conv2d(in_chans, self.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        for info, reduction in zip(self.feature_info, (1, 1, 2, 4, 8)):    # act1, layer1..layer4
            info["reduction"] = reduction


def _cfg(**kwargs) -> dict:
    return dict(url="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
                mean=CIFAR_MEAN, std=CIFAR_STD, classifier="fc", **kwargs)


default_cfgs = generate_default_cfgs({"resnet18_cifar": _cfg(pool_size=(4, 4), first_conv="conv1"),
                                      "vgg11_cifar": _cfg(pool_size=(1, 1), first_conv="features.0")})


@register_model
def resnet18_cifar(pretrained: bool = False, act_layer="relu", **kwargs) -> ResNet:
    act = resolve_act(act_layer)
    return build_model_with_cfg(ResNetCifarStem, "resnet18_cifar", pretrained, block=BasicBlock, layers=[2, 2, 2, 2],
                                act_layer=lambda inplace=False: act(), **kwargs)


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs) -> VGGCifar:
    return build_model_with_cfg(VGGCifar, "vgg11_cifar", pretrained, feature_cfg=dict(flatten_sequential=True),
                                **kwargs)
