"""Tiny registered models for fast CPU tests and examples (timm's ``test_*`` habit)."""
from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from bionets.layers.activations import resolve_act
from bionets.models.factory_args import model_options


class TinyMLP(nn.Module):
    """flatten -> Linear -> act -> Linear: no normalization, so DDP and 1-process runs match exactly.
    ``act_layer``: a timm or torch.nn activation name (default ReLU)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, hidden: int = 64,
                 act_layer="relu"):
        super().__init__()
        self.num_classes, self.num_features = num_classes, hidden
        self.fc1 = nn.Linear(in_chans * img_size * img_size, hidden)
        self.act = resolve_act(act_layer)()
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x.flatten(1)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def test_mlp(pretrained: bool = False, **kwargs) -> TinyMLP:
    return TinyMLP(**model_options(kwargs))
