"""Optimizers and learning-rate schedules, from timm, plus a registry for mechanism optimizers.

``optim.lr_mult`` maps glob patterns of parameter names to learning-rate multipliers (Dit-CNN trains
its quadratic parameters at 10x the base rate: ``lr_mult: {"*quad*": 10}``). Parameters matching no
pattern keep the base rate. 1-D parameters (norms, biases) and those the model names in timm's
``no_weight_decay()`` (a ViT's ``pos_embed`` and ``cls_token``) get no weight decay unless
``decay_norm_and_bias`` is set, as in timm's recipes.

A mechanism that needs its own optimizer (STDS's Grad R) registers a factory::

    @register_optimizer("gradr")
    def make(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer: ...
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import AfterValidator, Field
from timm.optim import OptimInfo, create_optimizer_v2, get_optimizer_info, list_optimizers
from timm.scheduler import create_scheduler_v2
from torch import nn

from bionets.configbase import Section
from bionets.errors import BionetsError, unknown

SCHEDULES = ("cosine", "step", "multistep", "const")
Beta = Annotated[float, Field(ge=0, lt=1)]                   # Adam's betas: running-average factors
# the optimizer classes that step by the raw gradient (momentum at most; LARS scales it per layer): a
# parameter whose gradient sums over many positions takes steps as large as that sum
SGD_CLASSES = ("SGD", "SGDW", "SGDP", "Lars", "SGD8bit", "FusedSGD")


def timm_optimizer(name: str) -> OptimInfo | None:
    """timm's description of optimizer ``name`` (which options it takes), or None for a name timm
    does not know."""
    return get_optimizer_info(name) if name in list_optimizers() else None


def sgd_like(name: str) -> bool:
    """Whether optimizer ``name`` (optim.name) steps by the raw gradient, as SGD does."""
    info = timm_optimizer(name.lower())
    cls = info.opt_class if info is not None else None
    return getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1]) in SGD_CLASSES


class OptimConfig(Section):
    name: Annotated[str, AfterValidator(str.lower)] = "sgd"     # (timm's names are lower case: 'SGD' is 'sgd')
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[Beta, Beta] | tuple[Beta, Beta, Beta] | None = None      # None: the optimizer's own (Adam's 0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] | None = None     # None: the optimizer's own (Adam's 1e-8)
    nesterov: bool = False
    decay_norm_and_bias: bool = False
    lr_mult: dict[str, Annotated[float, Field(ge=0)]] = {}     # 0 freezes; a negative rate would ascend
    kwargs: dict[str, float | int | str | bool] = {}   # extra options of a registered optimizer


class SchedConfig(Section):
    name: str = "cosine"
    warmup_epochs: float = Field(0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(0.0, ge=0)
    milestones: list[Annotated[int, Field(ge=1)]] = [80, 120]   # multistep: epochs where lr is multiplied by decay_rate
    decay_epochs: int = Field(30, ge=1)  # step: period
    decay_rate: float = Field(0.1, gt=0, le=1)   # above 1 the rate would grow


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig], torch.optim.Optimizer]] = {}


def register_optimizer(name: str):
    def wrap(fn):
        OPTIMIZERS[name] = fn
        return fn
    return wrap


def param_groups(model: nn.Module, cfg: OptimConfig, params: list[tuple[str, nn.Parameter]] | None = None) -> list[dict]:
    """Split trainable parameters into groups by lr multiplier and weight-decay eligibility."""
    named = params if params is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, float], list] = {}
    for name, p in named:
        pat = _lr_pattern(name, cfg)
        mult = cfg.lr_mult[pat] if pat is not None else 1.0
        wd = cfg.weight_decay if cfg.decay_norm_and_bias or (p.ndim > 1 and name not in exempt) else 0.0
        groups.setdefault((mult, wd), []).append(p)
    return [group(ps, cfg.lr, mult, weight_decay=wd) for (mult, wd), ps in groups.items()]


def group(params: list, lr: float, mult: float = 1.0, **options) -> dict:
    """A parameter group at ``mult`` times the base rate ``lr`` throughout the schedule, warm-up
    included: timm's schedulers compute one base schedule (from ``initial_lr``) and multiply it by
    each group's ``lr_scale``. (A group's own ``lr`` as its base would warm up every group from the
    same ``warmup_lr``: a 10x group reached 10x only at the end of the warm-up, and a 0.01x group
    started 10x above its peak.)"""
    return {"params": params, "lr": lr * mult, "initial_lr": lr, "lr_scale": mult, **options}


def _lr_pattern(name: str, cfg: OptimConfig) -> str | None:
    """The first ``lr_mult`` pattern that parameter ``name`` matches (its multiplier's key), or None."""
    return next((pat for pat in cfg.lr_mult if fnmatch.fnmatch(name, pat)), None)


def lr_mult_summary(model: nn.Module, cfg: OptimConfig) -> str:
    """One line saying how many trainable tensors each ``lr_mult`` pattern gave its multiplier (the
    first matching pattern wins), so that a pattern matching nothing, or matching only tensors an
    earlier pattern took, shows at the start of a run; '' without patterns."""
    if not cfg.lr_mult:
        return ""
    taken = {pat: 0 for pat in cfg.lr_mult}
    shadowed: dict[str, set[str]] = {pat: set() for pat in cfg.lr_mult}   # pattern -> earlier winners
    for name, p in model.named_parameters():
        if p.requires_grad and (pat := _lr_pattern(name, cfg)) is not None:
            taken[pat] += 1
            for later in (q for q in cfg.lr_mult if q != pat and fnmatch.fnmatch(name, q)):
                shadowed[later].add(pat)
    parts = [f"'{pat}' x{cfg.lr_mult[pat]:g} on {n} tensor(s)" if n
             else f"'{pat}' takes no parameter (the earlier {', '.join(repr(q) for q in sorted(shadowed[pat]))} "
                  "took its matches: first match wins)" if shadowed[pat]
             else f"'{pat}' matches no parameter"
             for pat, n in taken.items()]
    return "optim.lr_mult: " + "; ".join(parts)


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    from bionets.mechanisms.registry import load_builtin  # mechanisms register optimizers (gradr)

    load_builtin()
    if cfg.name in OPTIMIZERS:
        return OPTIMIZERS[cfg.name](model, cfg)
    info = timm_optimizer(cfg.name)
    if info is None:
        raise unknown("optimizer", cfg.name, list_optimizers() + list(OPTIMIZERS))
    if info.second_order:
        raise BionetsError(f"optim.name={cfg.name} is a second-order optimizer (its step needs the backward pass "
                           "to keep its graph, which bionets train does not): choose a first-order one")
    if cfg.betas is not None and info.has_betas and len(cfg.betas) != info.num_betas:
        raise BionetsError(f"optim.betas={list(cfg.betas)}: the {cfg.name} optimizer takes {info.num_betas} betas")
    extra = dict(cfg.kwargs)
    if taken := sorted(set(extra) & {"lr", "weight_decay", "params", "opt"}):
        raise BionetsError(f"optim.kwargs sets {', '.join(taken)}, which bionets sets itself (from optim.lr, "
                           "optim.weight_decay, optim.name and the model): remove it from optim.kwargs")
    for key, value in _taken_options(cfg, info).items():
        extra.setdefault(key, tuple(value) if key == "betas" else value)
    name = "nesterov" if cfg.name == "sgd" and cfg.nesterov else ("momentum" if cfg.name == "sgd" else cfg.name)
    try:
        return create_optimizer_v2(param_groups(model, cfg), opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   **extra)
    except (TypeError, ImportError, AssertionError) as err:   # an option it does not take; a package or CUDA missing
        raise BionetsError(f"optim.kwargs {dict(cfg.kwargs)} does not fit the {cfg.name} optimizer ({err}): "
                           "remove the option it names, or choose another optimizer") from None


def _taken_options(cfg: OptimConfig, info: OptimInfo) -> dict:
    """The options of ``cfg`` that timm's optimizer ``info`` takes: momentum (bionets' 0.9 by default) where
    it has one, betas and eps where it has them and the config sets them (else the optimizer's own)."""
    options = {"momentum": cfg.momentum} if info.has_momentum else {}
    options |= {"betas": cfg.betas} if info.has_betas and cfg.betas is not None else {}
    options |= {"eps": cfg.eps} if info.has_eps and cfg.eps is not None else {}
    return options


def unused_options_note(cfg: OptimConfig) -> str | None:
    """A note naming the optim options set away from their defaults that the chosen optimizer does
    not take (momentum under AdamW, betas under SGD, nesterov under anything but optim.name=sgd): they change
    nothing."""
    info = timm_optimizer(cfg.name)
    if info is None:
        return None
    unused = [k for k in ("momentum", "betas", "eps") if k not in _taken_options(cfg, info)]
    unused += ["nesterov"] if cfg.name != "sgd" else []
    changed = [f"{k}={getattr(cfg, k)}" for k in unused if getattr(cfg, k) != OptimConfig.model_fields[k].default]
    if not changed:
        return None
    return f"note: optim.name={cfg.name} does not take optim.{', optim.'.join(changed)} (ignored)"


def schedule_note(cfg: SchedConfig, epochs: int) -> str | None:
    """A note where a ``multistep`` milestone lies at or past the run's last epoch (a recipe run
    shorter, say): the rate never drops there."""
    late = [m for m in cfg.milestones if m >= epochs]
    if cfg.name != "multistep" or not late:
        return None
    return (f"note: sched.milestones {late} lie at or past train.epochs={epochs}: the learning rate never drops "
            "there (set sched.milestones for this length)")


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, epochs: int, steps_per_epoch: int):
    """A timm scheduler stepped after every optimizer update (``step_update(n)``): ``warmup_epochs``
    may be fractional (a warm-up of that many epochs' steps), and a ``multistep`` milestone m takes
    effect at the first step of epoch m (0-based, i.e. after m epochs)."""
    if cfg.name not in SCHEDULES:
        raise unknown("schedule", cfg.name, SCHEDULES)
    if cfg.warmup_epochs >= epochs and epochs > 0 and cfg.warmup_epochs > 0:
        raise BionetsError(f"sched.warmup_epochs={cfg.warmup_epochs} must be below train.epochs={epochs}: lower it "
                           f"(e.g. sched.warmup_epochs=0 for a run this short)")
    name = {"const": "step"}.get(cfg.name, cfg.name)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs,
        decay_epochs=10**9 if cfg.name == "const" else cfg.decay_epochs,
        decay_milestones=list(cfg.milestones), decay_rate=cfg.decay_rate,
        warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
        cooldown_epochs=0, step_on_epochs=False, updates_per_epoch=max(1, steps_per_epoch))
    if cfg.name == "multistep":
        # timm applies milestone t at index t - 1 (its per-epoch convention); per update that was the
        # last step of the epoch before the milestone's
        scheduler.decay_t = [m * max(1, steps_per_epoch) + 1 for m in sorted(cfg.milestones)]
    return scheduler


def require_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError where a loaded optimizer state holds a tensor of its parameter's rank but not
    its shape (momentum, Adam's moments: an edited or foreign checkpoint), which failed only at the
    first step. Factored states (Adafactor's row and column) have a lower rank and are left alone."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape != param.shape:
                raise ValueError(f"state '{name}' has shape {list(value.shape)}, its parameter {list(param.shape)}")
