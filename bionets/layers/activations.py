"""Activation layers by name: timm's names (``relu``, ``gelu``, ``silu``, ...) plus every torch.nn
activation class by its name (``softplus``, ``selu``), for the activation comparisons of the DNRT
paper (``act_layer`` in model kwargs and configs)."""
from __future__ import annotations

from timm.layers import get_act_layer
from torch import nn

from bionets.errors import BionetsError


def resolve_act(act_layer) -> type[nn.Module]:
    """timm's activation names plus any torch.nn activation class by name (``softplus``)."""
    if not isinstance(act_layer, str):
        return act_layer
    try:
        return get_act_layer(act_layer)
    except (KeyError, ValueError):
        by_name = {k.lower(): v for k, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module)}
        if act_layer.lower() in by_name:
            return by_name[act_layer.lower()]
        raise BionetsError(f"unknown activation {act_layer!r}: give one of timm's names (relu, gelu, silu, ...) or a "
                           "torch.nn activation class by name (softplus, selu, ...)") from None
