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

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bionets.errors import BionetsError, is_real, whole


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

    def __post_init__(self) -> None:
        """Whole numbers >= 0 and a finite rate >= 0, or one line: a schedule read a negative step
        as a positive D (the sine schedule is symmetric), a NaN total as the end of training, and
        the L1 prior failed on a NaN rate inside torch. The counts are kept as ints, the rate as a
        float (a 0-d tensor's value is read)."""
        bad = []
        for name in ("step", "total_steps", "epoch", "epochs"):
            value = getattr(self, name)
            if (n := whole(value)) is None or n < 0:
                bad.append(f"{name}={value!r}")
            else:
                object.__setattr__(self, name, n)
        lr = self.lr
        real = is_real(lr) or isinstance(lr, torch.Tensor) and lr.ndim == 0 and lr.is_floating_point()
        if real and 0 <= float(lr) < math.inf:
            object.__setattr__(self, "lr", float(lr))
        else:
            bad.append(f"lr={lr!r}")
        if bad:
            raise BionetsError(f"Progress needs whole numbers >= 0 for step, total_steps, epoch and epochs and a "
                               f"finite lr >= 0, got {', '.join(bad)}")


class Hook:
    """Base class with no-op defaults; override what the mechanism needs."""

    def __repr__(self) -> str:
        """The hook's class and its mechanism's settings (``cfg``, where it keeps them)."""
        cfg = getattr(self, "cfg", None)
        return f"{type(self).__name__}({cfg!r})" if cfg is not None else f"{type(self).__name__}()"

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
