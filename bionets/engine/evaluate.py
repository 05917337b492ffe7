"""``bionets eval`` and ``bionets export``: rebuild a checkpoint's model from its saved config."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.utils import parametrize

from bionets.config import config_from_dict
from bionets.data import build_data
from bionets.data.sources import data_options
from bionets.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from bionets.engine.distributed import parse_device
from bionets.engine.model import build_model, training_only_keys, use_channels_last
from bionets.engine.trainer import RUN_FILES, evaluate
from bionets.errors import BionetsError


def model_from_checkpoint(path: str | Path, *, device: torch.device | None = None, data_root: str | None = None,
                          ema: bool = False, need_data: bool = True, root_option: str = "--data-root DIR"):
    """(model, hooks, config, data bundle) rebuilt from a checkpoint's resolved config and weights.
    Without ``need_data`` the data is not loaded where the checkpoint records its class count and
    input channels (``data_info``, since 2026-11-26): the bundle is then None. ``root_option``: how
    the caller sets ``data_root``, for the data errors (nothing downloads here)."""
    state = load_checkpoint(path)
    raw = state["config"]
    if data_root is not None:
        raw = {**raw, "data": {**raw["data"], "root": data_root}}
    cfg = config_from_dict(raw)
    device = device or parse_device(cfg.train.device, "train.device")
    info = state.get("data_info")
    with data_options(root_option, None):
        data = build_data(cfg.data, seed=cfg.train.seed) if need_data or info is None else None
    shape = (data.num_classes, data.in_chans) if data is not None else (info["num_classes"], info["in_chans"])
    model, hooks, _ = build_model(cfg, *shape, device, init=False)
    if ema and state.get("ema") is None:
        raise BionetsError(f"checkpoint '{path}' has no EMA weights (train with train.ema_decay=...)")
    weights = {"model": _ema_weights(state["ema"])} if ema else state
    load_model_state(model, {**state, **weights}, path)
    return model, hooks, cfg, data


def _ema_weights(ema_state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in ema_state.items()}


def evaluate_checkpoint(path: str | Path, *, data_root: str | None = None, ema: bool = False) -> dict:
    """Test metrics of a checkpoint plus its mechanisms' metrics (e.g. sparsity)."""
    model, hooks, cfg, data = model_from_checkpoint(path, data_root=data_root, ema=ema)
    device = next(model.parameters()).device
    result = {"model": cfg.model.name, "dataset": cfg.data.name}
    result.update(evaluate(model, data.test, device, loss=cfg.train.loss, amp=cfg.train.amp,
                           channels_last=use_channels_last(cfg.train.channels_last, model, device, training=False)))
    for hook in hooks:
        result.update(hook.epoch_metrics(model))
    return result


def export_plain(path: str | Path, output: str | Path, data_root: str | None = None) -> str:
    """Bake every parametrization (e.g. STDS's effective weights) into plain tensors and save the
    model's state without its training-only state (ARR's class memory). The dataset is read only for
    checkpoints that do not record its shape (written before 2026-11-26). ``output`` may not be
    the checkpoint itself, nor another file of a run directory."""
    out = Path(output)
    if out.resolve() == Path(path).resolve() or (out.exists() and out.name in RUN_FILES):
        raise BionetsError(f"export would overwrite '{output}', a file of a training run: give another output "
                           "path (e.g. plain.pt)")
    model, _, cfg, _ = model_from_checkpoint(path, device=torch.device("cpu"), data_root=data_root, need_data=False)
    baked = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                baked += 1
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    drop = set(training_only_keys(model))
    plain = {k: v for k, v in model.state_dict().items() if k not in drop}
    save_checkpoint(Path(output), {"config": cfg.to_dict(), "plain_model": plain})
    return (f"exported {cfg.model.name} to {output}: {baked} reparameterized tensor(s) baked, "
            f"{zeros:,} of {total:,} parameters are exactly zero")
