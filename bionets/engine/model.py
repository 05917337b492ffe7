"""Building a run's model: timm's registry, then the configured mechanisms, then the device."""
from __future__ import annotations

import timm
import torch
from torch import nn

from bionets.engine.hooks import Hook
from bionets.errors import BionetsError, unknown
from bionets.mechanisms import Report, apply_mechanisms


def create_model(name: str, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with one-line errors for an unknown name or option."""
    import bionets.models  # noqa: F401  (registers bionets' models)

    if not timm.is_model(name):
        raise unknown("model", name, timm.list_models(), listed=bionets_models(),
                      see="'bionets models' lists bionets' models; any timm model name works too")
    if isinstance(kwargs.get("act_layer"), str):   # any torch.nn activation by name, e.g. softplus
        from bionets.models.cifar_nets import resolve_act
        kwargs = {**kwargs, "act_layer": resolve_act(kwargs["act_layer"])}
    try:
        return timm.create_model(name, pretrained=False, **{"num_classes": num_classes, "in_chans": in_chans, **kwargs})
    except TypeError as err:
        raise BionetsError(f"model '{name}' rejected its options {sorted(kwargs)}: {err}") from None


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def build_model(cfg, num_classes: int, in_chans: int, device: torch.device) -> tuple[nn.Module, list[Hook], list[Report]]:
    """The configured model with its mechanisms applied, on ``device``, hooks attached."""
    model = create_model(cfg.model.name, num_classes, in_chans, dict(cfg.model.kwargs))
    model, hooks, reports = apply_mechanisms(model, cfg.mechanisms)
    model.to(device)
    if use_channels_last(cfg.train.channels_last, model, device):
        model.to(memory_format=torch.channels_last)
    for hook in hooks:
        hook.attach(model)
    return model, hooks, reports


def use_channels_last(setting, model: nn.Module, device: torch.device) -> bool:
    if setting == "auto":
        return has_conv(model)
    return bool(setting)


def bionets_models() -> list[str]:
    """Names of the models that bionets registers with timm."""
    import bionets.models  # noqa: F401

    return sorted(n for n in timm.list_models()
                  if timm.models.model_entrypoint(n).__module__.startswith("bionets."))


def count_parameters(name: str, **kwargs) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters())
