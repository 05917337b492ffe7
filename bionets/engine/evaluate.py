"""Evaluation: a model's test metrics (every epoch of training, and ``bionets eval``), and
``bionets export``; both commands rebuild a checkpoint's model from its saved config."""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bionets.config import saved_config
from bionets.data import build_data
from bionets.data.sources import data_options
from bionets.engine.checkpoint import load_checkpoint, load_model_state, require_entries, save_checkpoint
from bionets.engine.distributed import all_reduce_sum, parse_device
from bionets.engine.metrics import topk_correct
from bionets.engine.model import build_model, training_only_keys, use_channels_last
from bionets.engine.rundir import RUN_FILES
from bionets.errors import BionetsError
from bionets.mechanisms import get_mechanism


def task_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy (hard or soft targets) or MSE against one-hot targets (spiking firing rates),
    smoothed as mixup's soft targets are (``1 - s + s/K`` on the class, ``s/K`` elsewhere)."""
    if kind == "mse_onehot":
        if targets.ndim == 1:
            k = logits.shape[1]
            targets = F.one_hot(targets, k).to(logits.dtype) * (1 - label_smoothing) + label_smoothing / k
        return F.mse_loss(logits, targets)
    if targets.ndim == 2:  # soft targets from mixup/cutmix (label smoothing already folded in)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def autocast_for(amp: str, device: torch.device):
    """A context factory for ``train.amp``: autocast in bf16 or fp16 on CUDA, in bf16 on the CPU
    (where the CPU has native bf16 arithmetic, AVX512-BF16 or AMX, convolutions and matmuls run
    faster: ResNet-20's step 1.5x here; elsewhere it is emulated and slower), a no-op for 'off' and
    for fp16 on the CPU (evaluating an fp16-trained checkpoint there; training refuses it)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None or (device.type == "cpu" and dtype == torch.float16):
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, loss: str = "ce", amp: str = "off",
             channels_last: bool = False) -> dict:
    """Test loss, top-1 and top-5 (percent), reduced over DDP ranks."""
    model.eval()
    autocast = autocast_for(amp, device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n
    for images, targets in loader:
        if not len(targets):              # an empty batch (a custom loader's): its mean loss would be NaN
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        top1, top5 = topk_correct(logits, targets)
        sums[:3] += torch.stack([task_loss(loss, logits, targets) * len(targets), top1, top5]).double()
        sums[3] += len(targets)          # a Python number added on the device: no host-to-device copy, no sync
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {"test_loss": sums[0].item() / n, "test_top1": 100 * sums[1].item() / n, "test_top5": 100 * sums[2].item() / n}

def model_from_checkpoint(path: str | Path, *, device: torch.device | None = None, data_root: str | None = None,
                          ema: bool = False, need_data: bool = True, root_option: str = "--data-root DIR"):
    """(model, hooks, config, data bundle) rebuilt from a checkpoint's resolved config and weights.
    The bundle holds the test split only (``train`` None: the training split's files need not be
    there). Without ``need_data`` the data is not loaded where the checkpoint records its class count and
    input channels (``data_info``; every checkpoint ``bionets train`` writes): the bundle is then
    None. ``root_option``: how the caller sets ``data_root``, for the data errors (nothing downloads
    here)."""
    state = load_checkpoint(path)
    require_entries(state, path, tuple(k for k in ("ema", "data_info") if state.get(k) is not None))
    raw = state["config"]
    if data_root is not None and isinstance(raw.get("data", {}), dict):   # (another kind: saved_config says so)
        raw = {**raw, "data": {**raw.get("data", {}), "root": data_root}}
    cfg = saved_config(raw, str(path))
    device = device or parse_device(cfg.train.device, "train.device")
    info = state.get("data_info")
    with data_options(root_option, None):
        data = build_data(cfg.data, seed=cfg.train.seed, test_only=True) if need_data or info is None else None
    trained_on = (info or {}).get("classes")
    here = [str(c) for c in data.classes] if data is not None else None
    if here is not None and isinstance(trained_on, list) and trained_on != here:
        # (another dataset, or its folders renamed: scored by class index all the same)
        k = next((k for k, (a, b) in enumerate(zip(trained_on, here)) if a != b), min(len(trained_on), len(here)))
        print(f"bionets: note: the data's classes are not the ones checkpoint '{path}' trained on (class {k}: "
              f"{_class_at(here, k)} here, {_class_at(trained_on, k)} in training): it is scored by class index",
              file=sys.stderr)
    shape = (data.num_classes, data.in_chans) if data is not None else (info["num_classes"], info["in_chans"])
    model, hooks, _ = build_model(cfg, *shape, device, init=False)
    if ema and state.get("ema") is None:
        raise BionetsError(f"checkpoint '{path}' has no EMA weights (train with train.ema_decay=...)")
    weights = {"model": _ema_weights(state["ema"])} if ema else state
    load_model_state(model, {**state, **weights}, path)
    return model, hooks, cfg, data


def _class_at(classes: list[str], k: int) -> str:
    return repr(classes[k]) if k < len(classes) else "none"


def _ema_weights(ema_state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in ema_state.items()}


def evaluate_checkpoint(path: str | Path, *, data_root: str | None = None, ema: bool = False,
                        device: str = "auto") -> dict:
    """Test metrics of a checkpoint plus its mechanisms' metrics (e.g. sparsity), on ``device`` (this
    machine's: not the one it trained on, ``train.device``, which may be one this machine lacks)."""
    model, hooks, cfg, data = model_from_checkpoint(path, data_root=data_root, ema=ema,
                                                    device=parse_device(device, "--device"))
    device = next(model.parameters()).device
    result = {"model": cfg.model.name, "dataset": cfg.data.name}
    result.update(evaluate(model, data.test, device, loss=cfg.train.loss, amp=cfg.train.amp,
                           channels_last=use_channels_last(cfg.train.channels_last, model, device, training=False)))
    for hook in hooks:
        result.update(hook.epoch_metrics(model))
    return result


def export_plain(path: str | Path, output: str | Path, data_root: str | None = None, ema: bool = False) -> str:
    """Bake every parametrization (e.g. STDS's effective weights) into plain tensors and save the
    model's state (``ema``: its EMA weights') without its training-only state (ARR's class memory).
    The dataset is read only for
    checkpoints that do not record its shape (not written by ``bionets train``). ``output`` may not be
    the checkpoint itself, nor another file of a run directory."""
    out = Path(output)
    if out.resolve() == Path(path).resolve() or (out.exists() and out.name in RUN_FILES):
        raise BionetsError(f"export would overwrite '{output}', a file of a training run: give another output "
                           "path (e.g. plain.pt)")
    model, _, cfg, _ = model_from_checkpoint(path, device=torch.device("cpu"), data_root=data_root, ema=ema,
                                             need_data=False)
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
    baked_text = f"{baked} reparameterized tensor(s) baked" if baked else "no reparameterized tensor to bake"
    said = (f"exported {cfg.model.name}{' (EMA weights)' if ema else ''} to {output}: {baked_text}, {zeros:,} of "
            f"{total:,} parameters are exactly zero")
    if kept := [n for n in cfg.mechanisms if not get_mechanism(n).leaves_plain]:
        said += (f"; it holds the modules of {', '.join(kept)}: load it into {cfg.model.name} with them applied "
                 "(bionets.convert with the saved config's settings), not into the bare model")
    return said
