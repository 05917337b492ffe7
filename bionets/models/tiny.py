"""Tiny registered models for fast CPU tests and examples (timm's ``test_*`` habit)."""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from bionets.layers.activations import resolve_act
from bionets.models.cifar_nets import classifier


class TinyMLP(nn.Module):
    """flatten -> Linear -> act -> Linear: no normalization, so DDP and 1-process runs match exactly.
    ``act_layer``: a timm or torch.nn activation name (default ReLU)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, hidden: int = 64,
                 act_layer="relu"):
        super().__init__()
        self.num_classes, self.num_features = num_classes, hidden
        self.fc1 = nn.Linear(in_chans * img_size * img_size, hidden)
        self.act = resolve_act(act_layer)()
        self.head = classifier(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x.flatten(1)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes, self.head = num_classes, classifier(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# no first_conv: its first layer is a Linear, which timm cannot adapt to other input channels
default_cfgs = generate_default_cfgs({"test_mlp": dict(url="", num_classes=10, input_size=(1, 8, 8), crop_pct=1.0,
                                                       mean=(0.0,), std=(1.0,), first_conv=None, classifier="head")})


@register_model
def test_mlp(pretrained: bool = False, **kwargs) -> TinyMLP:
    return build_model_with_cfg(TinyMLP, "test_mlp", pretrained, **kwargs)
