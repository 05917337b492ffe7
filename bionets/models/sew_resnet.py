"""SEW ResNet-18/34/50 (Fang et al., NeurIPS 2021) as used by STDS on ImageNet, built on
SpikingJelly's own ``activation_based.model.sew_resnet`` with multi-step IF neurons.

Changes to SpikingJelly's network, as in the STDS reference code (SPEC-STDS):

* direct encoding: the stem (7x7/2 conv ``in_chans``->64 + BN) runs once on the image and its
  output is repeated over T; then IF, max-pool 3/2 and the four stages run on [T, N, C, H, W];
* head: global average pool, **mean over T**, then ``fc`` (logits for cross-entropy);
* the connect function ``cnf`` (ADD, AND or IAND) combines the identity S and the residual
  branch's spikes A as ``S + A``, ``S * A`` or ``S * (1 - A)`` in every block (SpikingJelly's
  bottleneck computes ``A * (1 - S)`` for IAND; ours follows the paper and its basic block);
* neurons: IF, v_th 1, hard reset to 0 detached, ATan(alpha = 2) surrogate (one per neuron); every
  neuron's state is reset before and after each forward pass.
"""
from __future__ import annotations

import torch
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.model import sew_resnet as sj
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import nn

from bionets.errors import unknown
from bionets.models.snn_cifar import at_rest, build_spiking, check_images, check_time_steps, if_kwargs, repeat_over_time

CONNECT_FUNCTIONS = ("ADD", "AND", "IAND")


class Bottleneck(sj.Bottleneck):
    """SpikingJelly's SEW bottleneck with the connection applied as ``g(identity, out)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sn1(self.bn1(self.conv1(x)))
        out = self.sn2(self.bn2(self.conv2(out)))
        out = self.sn3(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample_sn(self.downsample(x))
        return sj.sew_function(identity, out, self.cnf)


class SEWResNet(sj.SEWResNet):
    """SpikingJelly's SEW ResNet with a once-run stem, a T-averaged head and timm's interface."""

    def __init__(self, block: type, layers: list[int], T: int = 4, cnf: str = "ADD", num_classes: int = 1000,
                 in_chans: int = 3, zero_init_residual: bool = False):
        if cnf not in CONNECT_FUNCTIONS:
            raise unknown("SEW connect function", cnf, CONNECT_FUNCTIONS)
        T = check_time_steps(T)
        # (a 0-class Linear, replaced below, warned that zero-element tensors are not initialized)
        super().__init__(block, layers, num_classes=max(num_classes, 1), zero_init_residual=zero_init_residual, cnf=cnf,
                         spiking_neuron=neuron.IFNode, **if_kwargs())
        functional.set_step_mode(self, "m")
        self.T, self.cnf, self.num_classes, self.in_chans = T, cnf, num_classes, in_chans
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)  # single-step stem
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(64)
        self.num_features = self.fc.in_features
        if num_classes == 0:
            self.fc = nn.Identity()        # timm's convention: no classifier, pre-logits out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image [N, C, H, W] -> spikes [T, N, C', H', W'], from neurons at rest."""
        check_images(self, x, self.in_chans)
        at_rest(self)
        x = repeat_over_time(self.bn1(self.conv1(x)), check_time_steps(self.T))
        x = self.maxpool(self.sn1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(2).mean(0)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.forward_head(self.forward_features(x))
        finally:
            at_rest(self)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _create(variant: str, block: type, layers: list[int], pretrained: bool, **kwargs) -> SEWResNet:
    return build_spiking(SEWResNet, variant, pretrained, block=block, layers=layers, **kwargs)


def _cfg() -> dict:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="conv1", classifier="fc")


default_cfgs = generate_default_cfgs({"sew_resnet18": _cfg(), "sew_resnet34": _cfg(), "sew_resnet50": _cfg()})


@register_model
def sew_resnet18(pretrained: bool = False, T: int = 4, cnf: str = "ADD", **kwargs) -> SEWResNet:
    """SEW ResNet-18 with IF neurons, T time steps, connect function ADD | AND | IAND."""
    return _create("sew_resnet18", sj.BasicBlock, [2, 2, 2, 2], pretrained, T=T, cnf=cnf, **kwargs)


@register_model
def sew_resnet34(pretrained: bool = False, T: int = 4, cnf: str = "ADD", **kwargs) -> SEWResNet:
    return _create("sew_resnet34", sj.BasicBlock, [3, 4, 6, 3], pretrained, T=T, cnf=cnf, **kwargs)


@register_model
def sew_resnet50(pretrained: bool = False, T: int = 4, cnf: str = "ADD", **kwargs) -> SEWResNet:
    return _create("sew_resnet50", Bottleneck, [3, 4, 6, 3], pretrained, T=T, cnf=cnf, **kwargs)
