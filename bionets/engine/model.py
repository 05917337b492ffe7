"""Building a run's model: timm's registry, then the configured mechanisms, then the device."""
from __future__ import annotations

import functools
import re

import timm
import torch
from torch import nn
from torch.utils.hooks import unserializable_hook

from bionets.engine.hooks import Hook
from bionets.errors import BionetsError, one_line, unknown
from bionets.layers.activations import resolve_act
from bionets.mechanisms import Report, apply_mechanisms


def create_model(name: str, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with one-line errors for an unknown name or option."""
    import bionets.models  # noqa: F401  (registers bionets' models)

    if not timm.is_model(name):
        raise unknown("model", name, timm.list_models(), listed=bionets_models(),
                      see="'bionets models' lists bionets' models; any timm model name works too")
    for key, data_has, unit in (("in_chans", in_chans, "channels"), ("num_classes", num_classes, "classes")):
        given = kwargs.get(key, data_has)
        # more outputs than classes is allowed; fewer, or other input channels, cannot train
        if isinstance(given, int) and (given < data_has or key == "in_chans" and given != data_has):
            raise BionetsError(f"model.kwargs.{key}={given}, but the data has {data_has} {unit}: leave {key} out of "
                               "model.kwargs (bionets sets it from the data)")
    given = ", ".join(f"{k}: {v!r}" for k, v in sorted(kwargs.items()))     # as written, for the errors
    if isinstance(kwargs.get("act_layer"), str):   # any torch.nn activation by name, e.g. softplus
        kwargs = {**kwargs, "act_layer": resolve_act(kwargs["act_layer"])}
    try:
        return timm.create_model(name, pretrained=False, **{"num_classes": num_classes, "in_chans": in_chans, **kwargs})
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, RuntimeError) as err:
        # timm checks its options with asserts, lookups and arithmetic: any of these is a refused option
        if not kwargs:
            raise BionetsError(f"model '{name}' cannot be built for {in_chans} input channels and {num_classes} "
                               f"classes ({one_line(err)}): choose another model") from None
        raise BionetsError(f"model '{name}' rejected model.kwargs {{{given}}} ({one_line(err)}): fix or remove "
                           "that option") from None


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def build_model(cfg, num_classes: int, in_chans: int, device: torch.device,
                init: bool = True) -> tuple[nn.Module, list[Hook], list[Report]]:
    """The configured model with its mechanisms applied, on ``device``, hooks attached; with ``init``,
    starting from the weights of ``model.init`` (:func:`load_initial_weights`)."""
    model = create_model(cfg.model.name, num_classes, in_chans, dict(cfg.model.kwargs))
    weights, training, saved = initial_weights(cfg.model.init) if init and cfg.model.init else (None, {}, None)
    loaded = weights is not None and load_initial_weights(model, weights, cfg.model.init, final=False)
    model, hooks, reports = apply_mechanisms(model, cfg.mechanisms)
    if weights is not None:
        report = loaded or load_initial_weights(model, weights, cfg.model.init, final=True, training=training,
                                                saved_from=saved)
        kept = fitting(model, training)     # the training-only state (ARR's memory) where this run has it too
        model.load_state_dict(kept, strict=False)
        if kept:
            report.changes.append(f"training state from the checkpoint: {', '.join(sorted(kept))}")
        reports.append(report)
    model.to(device)
    if use_channels_last(cfg.train.channels_last, model, device, training=False):   # the trainer checks it
        model.to(memory_format=torch.channels_last)
    for hook in hooks:
        hook.attach(model)
    return model, hooks, reports


def training_only_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the modules that mark themselves ``training_only`` (ARR's class memory):
    state that training needs and a trained model does not."""
    return [f"{name}.{key}" for name, module in model.named_modules() if getattr(module, "training_only", False)
            for key in module.state_dict()]


def initial_weights(path: str) -> tuple[dict, dict, str | None]:
    """The model weights of a checkpoint written by ``bionets train`` (its ``model``) or ``bionets
    export`` (its ``plain_model``), split into (weights, training-only state such as ARR's memory),
    and the name of the model it was saved from (None where it does not say)."""
    from bionets.engine.checkpoint import load_checkpoint, saved_model_name

    state = load_checkpoint(path, exported=True)
    weights = state["model"] if "model" in state else state["plain_model"]
    training = set(state.get("training_only", []))
    return ({k: v for k, v in weights.items() if k not in training},
            {k: v for k, v in weights.items() if k in training}, saved_model_name(state))


def upgraded(model: nn.Module, state: dict) -> dict:
    """``state`` with the entries of a module's former layout renamed by that module's own
    ``upgrade_state_dict(state, prefix)``, where it has one (RAA's separate v and c as vc)."""
    for name, module in model.named_modules():
        if callable(upgrade := getattr(module, "upgrade_state_dict", None)):
            state = upgrade(state, f"{name}." if name else "")
    return state


def fitting(model: nn.Module, state: dict) -> dict:
    """The entries of ``state`` that ``model`` has, in the same shape."""
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}


def load_initial_weights(model: nn.Module, weights: dict, source: str, *, final: bool,
                         training: dict | None = None, saved_from: str | None = None) -> Report | None:
    """Load ``weights`` into ``model`` where they fit it: the same tensors, except a classifier of
    another size (fine-tuning for other classes) and buffers the weights lack (ARR's class memory:
    fresh, unless the caller loads it from ``training``). Called
    before the mechanisms are applied (plain weights: the mechanisms then start from them, STDS
    from the trained weights, RAA and the quadratic term from their identity) and, if they did not
    fit there, after (a checkpoint trained with the same mechanisms); ``final``: the last try,
    which raises one error line instead of returning None. ``training``: the checkpoint's
    training-only state, which the caller loads where it fits: no buffer it gives counts as fresh.
    ``saved_from``: the model the weights were saved from, for the error line."""
    weights = upgraded(model, weights)
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {f"{name}.{k}" for name, m in model.named_modules() if m is head for k in m.state_dict()}
    resized = [k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape]
    params = {k for k, _ in model.named_parameters()}
    missing, extra = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    given = fitting(model, training or {})
    fresh = [k for k in missing if k not in params and k not in given]
    missing = [k for k in missing if k in params]
    if missing or extra or set(resized) - head_keys:
        if not final:
            return None
        odd = (missing and f"missing {missing[:2]}") or (extra and f"unexpected {extra[:2]}") or \
            f"other shapes at {sorted(set(resized) - head_keys)[:2]}"
        origin = f", saved from '{saved_from}'," if saved_from else ""
        raise BionetsError(f"model.init '{source}'{origin} does not fit this model, with or without its mechanisms "
                           f"({odd}): give weights of the same model (and mechanisms, or none)")
    model.load_state_dict({k: v for k, v in weights.items() if k not in resized}, strict=False)
    note = f"; classifier re-initialized ({len(resized)} tensors of another size)" if resized else ""
    note += f"; {len(fresh)} buffer(s) kept fresh ({fresh[0]}, ...)" if fresh else ""
    return Report("model.init", [f"weights from {source} ({len(weights) - len(resized)} tensors){note}"])


def match_layout_free_grad_strides(model: nn.Module) -> None:
    """Give the gradients of 4-D weights whose memory is the same in both layouts (1x1 kernels, one
    input channel: they differ only in the strides of size-1 dims) their weight's strides, before DDP
    wraps the model. Such a gradient comes back in the strides of the layout its convolution chose,
    which the input decides (ResNet-20's 1x1 shortcuts on channels_last maps: channels_last; a spiking
    net's 1x1 'linear' layers on [N, C, 1, 1] inputs: contiguous): autograd accepts either, but DDP
    compares every stride with its bucket's and warned "Grad strides do not match bucket view
    strides". The restriding is a view of the same memory (a tensor hook, before the gradient is
    stored)."""
    for p in model.parameters():      # (recursing: an STDS-parametrized weight's original too)
        if p.ndim == 4 and (p.shape[1] == 1 or p.shape[2] * p.shape[3] == 1):
            p.register_hook(unserializable_hook(functools.partial(_with_strides, p.stride())))


def _with_strides(strides: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor | None:
    """``grad`` as a view with ``strides``, where they differ from its own only on size-1 dims."""
    if grad.stride() == strides or any(a != b for a, b, n in zip(grad.stride(), strides, grad.shape) if n != 1):
        return None
    return grad.as_strided(grad.shape, strides, grad.storage_offset())


def use_channels_last(setting, model: nn.Module, device: torch.device, training: bool = True) -> bool:
    """Whether to run ``model`` in channels_last: ``auto`` is on for convolutional models, except on
    the CPU for a model with a narrow strided 1x1 convolution (:func:`cpu_channels_last_hazard`),
    where an explicit ``true`` is refused for ``training`` and left off otherwise (evaluation and
    export of a checkpoint trained on a GPU: the forward pass is unaffected)."""
    hazard = device.type == "cpu" and cpu_channels_last_hazard(model)
    if setting == "auto":
        return has_conv(model) and not hazard
    if setting and hazard and training:
        raise BionetsError(f"train.channels_last=true: on the CPU the weight gradient of a strided 1x1 convolution "
                           f"with fewer than 16 input channels ({hazard}) corrupts memory in channels_last "
                           "(oneDNN in torch 2.14): use train.channels_last=auto or false")
    return bool(setting) and not hazard


def cpu_channels_last_hazard(model: nn.Module) -> str:
    """The first strided 1x1 convolution with fewer than 16 input channels per group, or ''.

    On the CPU, oneDNN's weight gradient of such a convolution writes past its buffer when input or
    weight is channels_last (torch 2.14.1, AVX2: found with 2 to 7 input channels, 1x1 stride 2 on an
    8x8 map; 16 leaves room for AVX-512's wider vectors): glibc then aborts the process, or not."""
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
                 and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels // m.groups < 16), "")


def bionets_models() -> list[str]:
    """Names of the models that bionets registers with timm."""
    import bionets.models  # noqa: F401

    return sorted((n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("bionets.")),
                  key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])   # resnet20 < resnet110


def count_parameters(name: str, **kwargs) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters())
