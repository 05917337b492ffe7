"""CIFAR-style ResNet-18 and VGG-11 (the DNRT paper's CNN rows), registered with timm.

``resnet18_cifar`` is timm's own ResNet-18 with the usual CIFAR stem (a 3x3 stride-1 conv, no
max-pool) swapped in; ``vgg11_cifar`` is VGG-11 with BatchNorm for 32x32 inputs (512 features
after five 2x2 pools, one linear classifier). ``act_layer`` selects the activation (a timm name
or a torch.nn class name such as ``softplus``) for the activation comparisons.
"""
from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from bionets.layers.activations import resolve_act
from bionets.models.factory_args import model_options

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGGCifar(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, act_layer="relu"):
        super().__init__()
        act = resolve_act(act_layer)
        layers, c = [], in_chans
        for v in VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), act()]
                c = v
        self.features = nn.Sequential(*layers)
        self.num_classes, self.num_features = num_classes, 512
        self.fc = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes, self.fc = num_classes, nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet18_cifar(pretrained: bool = False, act_layer="relu", in_chans: int = 3, **kwargs) -> ResNet:
    kwargs = model_options(kwargs)
    act = resolve_act(act_layer)
    kwargs.setdefault("num_classes", 10)                 # CIFAR-10's, as the other *_cifar models
    model = ResNet(BasicBlock, [2, 2, 2, 2], in_chans=in_chans, act_layer=lambda inplace=False: act(), **kwargs)
    model.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs) -> VGGCifar:
    return VGGCifar(**model_options(kwargs))
