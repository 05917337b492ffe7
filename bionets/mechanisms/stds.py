"""Mechanisms ``stds`` and ``gradr``: sparse weights by reparameterization (SPEC-STDS).

``stds`` (Chen et al., ICML 2022) gives the chosen layers the soft threshold
``w = sign(theta) * max(|theta| - D, 0)`` (:mod:`bionets.layers.stds`) and a hook that raises D
after every optimizer step by the sine, linear or fixed schedule (N = steps per epoch x epochs,
per process). ``gradr`` (Gradient Rewiring, the baseline) gives them a fixed sign and a strength
(:mod:`bionets.layers.gradr`); it is trained with ``optim.name: gradr``. Both log the exact zeros
of the effective weights per layer and in total every epoch (``sparsity``, ``sparsity/<layer>``,
in percent) and draw sparsity and accuracy against training progress at the end
(``sparsity.png`` in the run directory).

Options (``mechanisms: {stds: {...}}``): ``sparse_function`` stmod | st | identity,
``schedule`` sine | linear | fixed, ``d_max`` (>= 0, theta units; does not transfer between
optimizers), ``include`` / ``exclude`` (glob patterns of layer names), ``types`` (conv, linear),
``l1`` (>= 0: the STDS code's L1 prior on theta, its "fixed D + L1 prior" with ``schedule: fixed``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from bionets.configbase import Section
from bionets.engine.hooks import Hook, Progress
from bionets.engine.optim import OptimConfig, group, param_groups, register_optimizer
from bionets.errors import BionetsError, require_module
from bionets.layers.gradr import GradR, apply_gradr, strengths
from bionets.layers.sparse_reparam import other_settings_error, pruned_layers, sparsity, weight_reparam
from bionets.layers.stds import SoftThreshold, apply_stds, schedule_differences, soft_thresholds, threshold_at
from bionets.mechanisms.registry import Applied, OptimizerNote, Report, register_mechanism

LayerType = Literal["conv", "linear"]


class LayerChoice(Section):
    include: list[str] = ["*"]                  # glob patterns of module names, e.g. ["layer*"]
    exclude: list[str] = []                     # e.g. ["fc"] (ImageNet: the classifier is not pruned)
    types: Annotated[list[LayerType], Field(min_length=1)] = ["conv", "linear"]   # (none chose no layer)


class StdsConfig(LayerChoice):
    sparse_function: Literal["stmod", "st", "identity"] = "stmod"
    schedule: Literal["sine", "linear", "fixed"] = "sine"
    d_max: float = Field(1.0, ge=0)
    # the STDS code's L1 prior (its "fixed D + L1 prior"): after every optimizer step |theta| shrinks
    # by lr * l1, clamped at 0; 0 (the paper's STDS): none
    l1: float = Field(0.0, ge=0)


class GradrConfig(LayerChoice):
    alpha: float = Field(1e-3, gt=0)
    target_sparsity: float = Field(0.95, ge=0.5, lt=1)


class SparsityHook(Hook):
    """Logs the sparsity of the effective weights every epoch and plots it at the end of training."""

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        return sparsity(model).metrics()

    def on_train_end(self, run_dir: Path, history: list[dict]) -> None:
        if history:
            plot_sparsity(history, Path(run_dir) / "sparsity.png", f"run {Path(run_dir).name}: {self.method()}")

    def method(self) -> str:
        return "Grad R"


class StdsHook(SparsityHook):
    """Sets D of every STDS layer from the training progress after each optimizer step, and with
    ``l1`` shrinks theta: ``theta <- sign(theta) * max(|theta| - lr * l1, 0)`` (lr: the step's base rate)."""

    def __init__(self, cfg: StdsConfig, model: nn.Module):
        self.cfg = cfg
        self.attach(model)
        self.copies: dict[int, list] = {}     # id(EMA model) -> its STDS parametrizations

    def attach(self, model: nn.Module) -> None:
        """Drive ``model``'s STDS layers from now on (a copy's, a reloaded model's): the next step sets
        their D, whatever the layers of another model held."""
        require_module(model, "StdsHook.attach")
        self.layers = soft_thresholds(model)
        if not self.layers:
            raise BionetsError(f"StdsHook.attach: the {type(model).__name__} has no STDS layer to drive: attach it to "
                               "the model bionets.convert(model, sparsity='stds') returned, or a copy of that model")
        self.thetas = [layer.parametrizations.weight.original for _, layer in pruned_layers(model)
                       if isinstance(weight_reparam(layer), SoftThreshold)]
        self.d: float | None = None

    def on_step(self, progress: Progress) -> None:
        if not isinstance(progress, Progress):
            raise BionetsError(f"StdsHook.on_step takes a bionets.engine.hooks.Progress(step, total_steps, epoch, "
                               f"epochs, lr), got {type(progress).__name__}")
        d = threshold_at(self.cfg.schedule, self.cfg.d_max, progress.step, progress.total_steps)
        if d != self.d:
            for p in self.layers:
                p.d.fill_(d)
            self.d = d
        if self.cfg.l1 and progress.lr:
            shrink = progress.lr * self.cfg.l1      # (Progress checks lr; an overflow to inf is left)
            if not 0 <= shrink < float("inf"):
                raise BionetsError(f"STDS l1 prior: the shrink lr * l1 = {progress.lr!r} * {self.cfg.l1!r} must be a "
                                   "finite number >= 0: lower the learning rate or l1")
            with torch.no_grad():
                for theta in self.thetas:       # softshrink: sign(theta) max(|theta| - lambda, 0)
                    theta.copy_(torch.nn.functional.softshrink(theta, shrink))

    def copy_state(self, model: nn.Module, copy: nn.Module) -> None:
        """The EMA model computes with the scheduled D (an average of D over the steps lags the
        schedule: a far less sparse model); only theta is averaged."""
        require_module(copy, "StdsHook.copy_state(model, copy)")
        if self.d is None:
            return
        if id(copy) not in self.copies:
            self.copies[id(copy)] = soft_thresholds(copy)
        for p in self.copies[id(copy)]:
            p.d.fill_(self.d)

    def method(self) -> str:
        c = self.cfg
        if c.sparse_function == "identity":
            return "dense baseline (STDS identity)"
        l1 = f", L1 {c.l1:g}" if c.l1 else ""
        return f"STDS {c.sparse_function}, {c.schedule} schedule to D_max {c.d_max:g}{l1}"

    def may_be_best(self) -> bool:
        """Only a model at the final threshold (the run's sparsity) competes for best.pt: during a
        sine or linear schedule, an early, dense epoch often scores higher. The dense baseline
        (``identity``: w = theta, D unused) lets every epoch compete."""
        return self.cfg.sparse_function == "identity" or self.d == self.cfg.d_max

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        layers = soft_thresholds(model)
        # D in float32: 0.01, not 0.00999999977; none for the dense baseline ('identity'), which D does not touch
        used = layers and layers[0].sparse_function != "identity"
        out = {"stds_d": float(f"{layers[0].d.item():g}")} if used else {}
        return {**super().epoch_metrics(model), **out}


def _report(name: str, model: nn.Module, layers: list[str], done_before: set[str], what: str) -> Report:
    """One line per newly reparameterized layer (layers done by an earlier call are not changes,
    but a note says they are left as they were)."""
    report = Report(name)
    for layer in (n for n in layers if n not in done_before):
        report.changes.append(f"{layer}: {what} ({model.get_submodule(layer).weight.numel():,} weights)")
    if done_before and not report.changes:
        report.notes.append(f"the model carries {len(done_before)} sparse reparameterization(s) already: left as they "
                            "are, with their own settings")
    return report


@register_mechanism("stds", StdsConfig, order=30, leaves_plain=True)   # (baked)
def apply_stds_mechanism(model: nn.Module, cfg: StdsConfig) -> Applied:
    done = {n for n, _ in pruned_layers(model)}
    settings = _schedule_settings(cfg)
    _check_same_schedule(model, done, settings)
    d0 = threshold_at(cfg.schedule, cfg.d_max, 0, 1)   # fixed: theta_0 = sign(w_0)(|w_0| + D_max)
    layers = apply_stds(model, cfg.sparse_function, d0, include=cfg.include, exclude=cfg.exclude, types=cfg.types,
                        schedule=settings)      # what the hooks drive them by
    what = (f"STDS {cfg.sparse_function} soft threshold, {cfg.schedule} schedule to D={cfg.d_max:g}"
            + (f", L1 prior {cfg.l1:g}" if cfg.l1 else ""))
    report = _report("stds", model, layers, done, what)
    below = _share_below(model, [n for n in layers if n not in done], cfg.d_max)
    if cfg.schedule != "fixed" and cfg.sparse_function != "identity" and below is not None and below >= 0.9:
        report.notes.append(f"d_max={cfg.d_max:g} is above |w| of {below:.1%} of these weights at the start: only "
                            "those that training grows past it survive the schedule (as they do in long runs: the "
                            "paper uses 1-5 on its CIFAR SNN with Adam at lr 1e-4 for 2048 epochs, 0.1-5 on ImageNet "
                            "with SGD; weights that stay near their initial size end at zero). D is in weight "
                            "units: pick it for this model and optimizer")
    low = {model.get_submodule(n).weight.dtype for n in layers if n not in done} & {torch.bfloat16, torch.float16}
    if low and d0 > 0 and cfg.sparse_function != "identity":
        # theta = sign(w) (|w| + D) holds w in fewer bits the larger D is: 7 stored bits in bf16, 10 in fp16
        step = d0 / 2 ** (7 if torch.bfloat16 in low else 10)
        names = sorted(str(t).removeprefix("torch.") for t in low)
        report.notes.append(f"the weights are {', '.join(names)}: theta = sign(w) (|w| + D) at the fixed start "
                            f"rounds them to steps of ~{step:.2g} near D={d0:g}, so the start is not the model's own "
                            "weights exactly; keep the model in float32 and train under autocast (train.amp=bf16)")
    return Applied(model, [StdsHook(cfg, model)], report)


def _schedule_settings(cfg: StdsConfig) -> dict:
    return {"sparse_function": cfg.sparse_function, "schedule": cfg.schedule, "d_max": cfg.d_max, "l1": cfg.l1}


def _check_same_schedule(model: nn.Module, done: set[str], settings: dict) -> None:
    """One STDS schedule a model: every hook drives all of its STDS layers, so applying STDS again
    with other settings would silently drive the earlier layers by the new schedule. This checks
    every layer a schedule drives, chosen now or not, before any is changed; :func:`apply_stds`
    compares the chosen ones by the same rule (:meth:`SoftThreshold.differences`, and the sparse
    function of those made without a schedule), with the same message."""
    for name in sorted(done):
        had = getattr(weight_reparam(model.get_submodule(name)), "schedule", None)
        if had is not None and (differ := schedule_differences(had, settings)):
            raise other_settings_error("STDS", name, differ)


def _share_below(model: nn.Module, layers: list[str], d: float) -> float | None:
    """The share of the layers' weights with |w| <= d (None for no weights, or shapes only)."""
    weights = [model.get_submodule(n).weight.detach() for n in layers]
    weights = [w for w in weights if w.device.type != "meta"]
    total = sum(w.numel() for w in weights)
    return sum(int((w.abs() <= d).sum()) for w in weights) / total if total else None


@register_mechanism("gradr", GradrConfig, order=30, optimizer="gradr", leaves_plain=True)
def apply_gradr_mechanism(model: nn.Module, cfg: GradrConfig) -> Applied:
    done = {n for n, _ in pruned_layers(model)}
    layers = apply_gradr(model, cfg.alpha, cfg.target_sparsity, include=cfg.include, exclude=cfg.exclude,
                         types=cfg.types)
    what = f"Grad R sign and strength, alpha={cfg.alpha:g}, target sparsity {cfg.target_sparsity:g}"
    report = _report("gradr", model, layers, done, what)
    if report.changes:
        report.notes.append(OptimizerNote("train with the gradr optimizer (optim.name=gradr; in Python "
                                          "bionets.mechanisms.stds.create_gradr(model, optim_config)): Grad R's prior "
                                          "step is part of it", "gradr"))
    return Applied(model, [SparsityHook()], report)


@register_optimizer("gradr")
def create_gradr(model: nn.Module, cfg: OptimConfig) -> GradR:
    """The ``gradr`` optimizer for a model given Grad R's parametrization (``mechanisms: {gradr: ...}``)."""
    require_module(model, "create_gradr")
    if not isinstance(cfg, OptimConfig):
        raise BionetsError(f"create_gradr takes an OptimConfig (bionets.engine.optim.OptimConfig(name='gradr', "
                           f"lr=1e-3)), got {type(cfg).__name__}")
    found = strengths(model)
    if not found:
        raise BionetsError("optim.name 'gradr' trains Grad R strengths, but the model has none: add "
                           "'mechanisms: {gradr: {alpha: 1e-3, target_sparsity: 0.95}}' to the config")
    ids = {id(p) for _, p, _ in found}
    groups: dict[tuple[float, float], list] = {}
    for _, p, reparam in found:
        groups.setdefault((reparam.alpha, reparam.mu), []).append(p)
    prior_groups = [group(ps, cfg.lr, alpha=a, mu=mu, weight_decay=0.0) for (a, mu), ps in groups.items()]
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    adam = {k: tuple(v) if k == "betas" else v for k in ("betas", "eps") if (v := getattr(cfg, k)) is not None}
    return GradR(prior_groups + param_groups(model, cfg, rest), lr=cfg.lr, **adam)


def plot_sparsity(history: list[dict], path: Path, title: str = "") -> None:
    """Per-layer and total sparsity (left) and accuracy with total sparsity (right) against epochs,
    both in percent on one scale."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    layers = [k for k in history[-1] if k.startswith("sparsity/")]
    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    cmap = colormaps["viridis"].resampled(max(1, len(layers)))
    for i, key in enumerate(layers):
        left.plot(epochs, [r.get(key, float("nan")) for r in history], color=cmap(i), lw=1,
                  label=key.removeprefix("sparsity/") if len(layers) <= 12 else None)
    left.plot(epochs, [r.get("sparsity", float("nan")) for r in history], color="black", lw=2.5, label="total")
    left.set(xlabel="epoch", ylabel="sparsity (% zero weights)", title="sparsity per layer", ylim=(-2, 102))
    left.legend(fontsize=7, ncol=2)
    for key, style in (("test_top1", "-"), ("train_top1", "--")):
        if key in history[-1]:
            right.plot(epochs, [r[key] for r in history], style, color="tab:blue", label=key)
    right.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy and total sparsity", ylim=(-2, 102))
    twin = right.twinx()
    twin.plot(epochs, [r.get("sparsity", float("nan")) for r in history], color="black", lw=2, label="sparsity")
    twin.set(ylabel="sparsity (%)", ylim=(-2, 102))
    lines = right.get_lines() + twin.get_lines()
    right.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
