"""Per-epoch metrics: to the console, to TensorBoard (``tb/``) and to ``metrics.jsonl``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Counts of samples whose target is among the top-k logits (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(targets.view(-1, 1))
    return [hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]


class MetricsWriter:
    """Writes one record per epoch; only rank 0 makes one.

    It starts from ``history``, the run's records so far (a fresh run: none; a resumed run: the
    checkpoint's): ``metrics.jsonl`` is rewritten to hold exactly those, and TensorBoard drops its
    events from the next epoch on. So resuming from an older checkpoint (``best.pt``), or into a run
    directory used before, does not log epochs twice; resuming into a new run directory gives its
    TensorBoard the history too, as its ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, history: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        from bionets.engine.files import make_output_dir, write_atomic

        self.jsonl = run_dir / "metrics.jsonl"
        write_atomic(self.jsonl, lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))
        make_output_dir(run_dir / "tb", "another out_dir (--out-dir) or name, or move that file")   # (not a traceback)
        fresh = not any((run_dir / "tb").glob("events.out.tfevents.*"))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=len(history) + 1)
        for record in history if fresh else ():
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, record["epoch"])

    def write(self, record: dict) -> None:
        self._scalars(record)
        self.tb.flush()
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.tb.close()


# the engine's own per-epoch metrics (train_epoch's and evaluate's), each with its console format
FORMATS = {"train_loss": "{:.4f}", "train_top1": "{:.2f}", "test_loss": "{:.4f}", "test_top1": "{:.2f}",
           "test_top5": "{:.2f}", "lr": "{:.3g}", "images_per_s": "{:.0f}", "epoch_time": "{:.1f}s"}


def console_line(record: dict) -> str:
    """One readable line per epoch: the standard metrics, then the EMA model's (in the same
    formats) and any mechanism's totals."""
    parts = [f"epoch {record['epoch']:>3}"]
    parts += [f"{k} {FORMATS[k].format(record[k])}" for k in FORMATS if k in record]
    for k, v in record.items():
        if k in FORMATS or k == "epoch" or "/" in k:
            continue
        form = FORMATS.get(k.removeprefix("ema_"), "{:.2f}" if isinstance(v, float) and abs(v) >= 1 else "{:.4g}")
        parts.append(f"{k} {form.format(v)}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)
