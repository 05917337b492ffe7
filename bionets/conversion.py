"""``bionets.convert``: retrofit the three mechanisms onto any timm or torchvision model in one call.

    model, report = bionets.convert(timm.create_model("resnet50"),
                                    quadratic=["layer1.0.conv2"],   # Dit channel-wise quadratic term
                                    activation="raa",               # DNRT's RAA instead of ReLU/GELU/SiLU
                                    sparsity="stds")                # STDS soft-threshold reparameterization
    print(report)

Each argument takes ``None``/``False`` (leave it), ``True`` or a short string (the mechanism's
defaults), or a dict of the mechanism's config options (the same keys as the ``mechanisms:``
section of a run config, so ``bionets train`` applies the same changes to any timm model by name).
``quadratic`` takes placement patterns instead of a short string (one or a list; ``"auto"``: the
default placement). ``sparsity="gradr"`` applies Grad R (the STDS paper's baseline) with its
defaults, trained by its own optimizer (:func:`bionets.mechanisms.stds.create_gradr`); a dict of
``sparsity`` options is STDS's, and ``{short name: options}`` gives a short name's mechanism options
of its own (``sparsity={"gradr": {"alpha": 1e-3}}``, ``activation={"raa_relu": {"variant": "scalar"}}``).
Converting an already converted model changes nothing more; a convert that fails leaves the model as
it was (:func:`convert`). The training-time
parts (ARR's loss, STDS's threshold schedule) come back as hooks in ``report.hooks`` for a training
loop of your own; ``bionets train`` wires them itself. New modules and buffers take the model's
device and dtype (ARR's class statistics stay float32).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from bionets.config import validate_section
from bionets.engine.hooks import Hook
from bionets.errors import BionetsError
from bionets.mechanisms import Report, apply_mechanisms, get_mechanism

SHORTHANDS = {
    "activation": {"raa": ("raa", {}), "raa_relu": ("raa", {"base": "relu"})},
    "regularization": {"arr": ("arr", {})},
    "sparsity": {"stds": ("stds", {}), "st": ("stds", {"sparse_function": "st"}),
                 "identity": ("stds", {"sparse_function": "identity"}), "gradr": ("gradr", {})},
}
MECHANISM_OF = {"quadratic": "quadratic", "activation": "raa", "sparsity": "stds", "regularization": "arr"}


@dataclass
class ConversionReport:
    """What convert changed: one :class:`Report` per mechanism, and the hooks for training."""

    reports: list[Report] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)

    @property
    def params_added(self) -> int:
        return sum(r.params_added for r in self.reports)

    @property
    def changes(self) -> int:
        return sum(len(r.changes) for r in self.reports)

    def __str__(self) -> str:
        body = "\n".join(str(r) for r in self.reports) or "nothing to convert"
        return f"{body}\ntotal: {self.changes} change(s), +{self.params_added:,} parameters"


def _section(arg: str, value) -> tuple[str, dict, str] | None:
    """(mechanism, its options, where the user gave them: ``arg``, or ``arg.choice``)."""
    if value is None or value is False:
        return None
    if value is True:
        return MECHANISM_OF[arg], {}, arg
    if isinstance(value, str) and arg == "quadratic":       # 'auto', or one placement pattern
        return "quadratic", {"placement": "auto" if value == "auto" else [value]}, arg
    if isinstance(value, str):
        table = SHORTHANDS.get(arg, {})
        if value not in table:
            raise BionetsError(f"convert({arg}={value!r}): unknown choice; use one of {sorted(table)} or a dict of options")
        return (*table[value], arg)
    if isinstance(value, (list, tuple)) and arg == "quadratic":
        return "quadratic", {"placement": list(value)}, arg
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SHORTHANDS.get(arg, {}):
        # {choice: options}: a short name's mechanism with options of its own (sparsity={'gradr': {...}})
        (choice, opts), = value.items()
        if opts is not None and not isinstance(opts, dict):
            raise BionetsError(f"convert({arg}={{{choice!r}: ...}}) takes a dict of {choice}'s options, got "
                               f"{type(opts).__name__}")
        name, defaults = SHORTHANDS[arg][choice]
        return name, {**defaults, **(opts or {})}, f"{arg}.{choice}"
    if isinstance(value, dict):
        return MECHANISM_OF[arg], dict(value), arg
    raise BionetsError(f"convert({arg}=...) takes None, True, a name or a dict of options, got {type(value).__name__}")


def convert(model: nn.Module, *, quadratic=None, activation=None, sparsity=None,
            regularization=None) -> tuple[nn.Module, ConversionReport]:
    """Apply the chosen mechanisms to ``model`` in place; return it and a report.

    The mechanisms change the model one after another (quadratic, raa, stds, arr); where one raises,
    the model is restored as it was (its module tree, attributes, classes and parameter storage:
    :func:`_snapshot`), so that a failed convert leaves no half-converted model."""
    if not isinstance(model, nn.Module):
        raise BionetsError(f"convert takes a torch.nn.Module, got {type(model).__name__}: create the model first "
                           "(e.g. timm.create_model(name))")
    sections = {}
    for arg, value in (("quadratic", quadratic), ("activation", activation), ("sparsity", sparsity),
                       ("regularization", regularization)):
        picked = _section(arg, value)
        if picked is not None:
            name, opts, where = picked
            config = get_mechanism(name).config
            try:
                sections[name] = validate_section(config, opts, where)
            except BionetsError as err:
                gradr_only = set(get_mechanism("gradr").config.model_fields) - set(config.model_fields)
                if name == "stds" and gradr_only & set(opts):                  # Grad R's options, given as STDS's
                    raise BionetsError(f"{err}; Grad R's options go in sparsity={{'gradr': {{...}}}}") from None
                raise
    restore = _snapshot(model)
    try:
        model, hooks, reports = apply_mechanisms(model, sections)
    except BaseException:
        restore()
        raise
    return model, ConversionReport(reports, hooks)


def _snapshot(model: nn.Module):
    """A function that puts ``model`` back as it is now: every module's class (a parametrization
    changes it), attributes and the contents of its dicts and sets (children, parameters, buffers,
    hooks: the same dict objects, refilled, so hook handles keep working), and the storage of every
    parameter and buffer (``register_parametrization`` moves a weight to its new value by ``set_``)."""
    modules = [(m, type(m), dict(vars(m)), {k: v.copy() for k, v in vars(m).items() if isinstance(v, dict | set)})
               for m in model.modules()]
    tensors = [(t, t.detach()) for t in (*model.parameters(), *model.buffers())
               if not nn.parameter.is_lazy(t)]        # (a lazy module's, not yet made, have no storage)

    def restore() -> None:
        for m, cls, attrs, contents in modules:
            m.__class__ = cls
            vars(m).clear()
            vars(m).update(attrs)
            for k, v in contents.items():
                attrs[k].clear()
                attrs[k].update(v)
        with torch.no_grad():
            for t, data in tensors:
                if (t.data_ptr(), t.shape, t.stride()) != (data.data_ptr(), data.shape, data.stride()):
                    t.set_(data)
        if "spikingjelly" in sys.modules:        # its reset_net caches each net's neurons
            from spikingjelly.activation_based import functional
            for m, *_ in modules:
                functional.invalidate_reset_cache(m)
    return restore
