"""``bionets eval`` and ``bionets export``: rebuild a checkpoint's model from its saved config."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.utils import parametrize

from bionets.config import config_from_dict
from bionets.data import build_data
from bionets.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from bionets.engine.distributed import pick_device
from bionets.engine.model import build_model, use_channels_last
from bionets.engine.trainer import evaluate


def model_from_checkpoint(path: str | Path, *, device: torch.device | None = None, data_root: str | None = None,
                          ema: bool = False):
    """(model, hooks, config, data bundle) rebuilt from a checkpoint's resolved config and weights."""
    state = load_checkpoint(path)
    raw = state["config"]
    if data_root is not None:
        raw = {**raw, "data": {**raw["data"], "root": data_root}}
    cfg = config_from_dict(raw)
    device = device or pick_device(cfg.train.device)
    data = build_data(cfg.data, seed=cfg.train.seed)
    model, hooks, _ = build_model(cfg, data.num_classes, data.in_chans, device, init=False)
    if ema and state.get("ema") is None:
        from bionets.errors import BionetsError
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
                           channels_last=use_channels_last(cfg.train.channels_last, model, device)))
    for hook in hooks:
        result.update(hook.epoch_metrics(model))
    return result


def export_plain(path: str | Path, output: str | Path) -> str:
    """Bake every parametrization (e.g. STDS's effective weights) into plain tensors and save."""
    model, _, cfg, _ = model_from_checkpoint(path, device=torch.device("cpu"))
    baked = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                baked += 1
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    save_checkpoint(Path(output), {"config": cfg.to_dict(), "plain_model": model.state_dict()})
    return (f"exported {cfg.model.name} to {output}: {baked} reparameterized tensor(s) baked, "
            f"{zeros:,} of {total:,} parameters are exactly zero")
