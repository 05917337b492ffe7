"""How a mechanism plugs into training: small, named hooks; the engine knows nothing else of it.

A mechanism (``bionets.mechanisms``) turns its config section into a model change plus a list of
:class:`Hook` objects. The engine calls, in this order:

* ``attach(model)`` once, after the model is built and moved to its device, before DDP wraps it;
* ``aux_loss(model, images, logits, targets)`` after every training forward pass: a scalar added
  to the task loss (``None`` for nothing). ``targets`` are hard integer labels, also when
  mixup/cutmix mixes the images: then the class with the larger share of each mixed image (ARR
  pulls its response towards that class's mean). Hooks capture features with forward hooks of their
  own;
* ``on_step(progress)`` after every optimizer step (schedules such as STDS's threshold D);
* ``copy_state(model, copy)`` right after, where the run keeps a copy of the model (the EMA model):
  copy the state ``on_step`` drives (a schedule's value, which an average of weights must not
  average) from the model to the copy;
* ``epoch_metrics(model)`` at the end of every epoch on every rank: extra numbers for the console,
  TensorBoard and metrics.jsonl (e.g. sparsity); the last epoch's, where their names hold
  no ``/``, also in summary.json;
* ``may_be_best()`` then: whether this epoch's model may become ``best.pt`` (STDS: only once its
  threshold has reached D_max, so that the best model has the sparsity the run asked for);
* ``on_train_end(run_dir, history)`` on rank 0 after the last epoch (figures), ``history`` being
  the list of per-epoch metric dicts.

State a hook must keep across checkpoints belongs in module buffers of the model (saved with it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps done (per process) out of the run's total, epochs
    completed out of the run's, and the base learning rate of the step just taken (0 where none was:
    the call at start-up)."""

    step: int
    total_steps: int
    epoch: int
    epochs: int
    lr: float = 0.0


class Hook:
    """Base class with no-op defaults; override what the mechanism needs."""

    def attach(self, model: nn.Module) -> None:
        pass

    def aux_loss(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor | None:
        return None

    def on_step(self, progress: Progress) -> None:
        pass

    def copy_state(self, model: nn.Module, copy: nn.Module) -> None:
        pass

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        return {}

    def may_be_best(self) -> bool:
        return True

    def on_train_end(self, run_dir: Path, history: list[dict]) -> None:
        pass
