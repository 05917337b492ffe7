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
    """Writes one record per epoch; only rank 0 makes one."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict) -> None:
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, epoch)
        self.tb.flush()
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.tb.close()


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def console_line(record: dict) -> str:
    keys = ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "images_per_s", "epoch_time")
    parts = [f"epoch {record['epoch']:>3}"]
    for k in keys:
        if k in record:
            v = record[k]
            parts.append(f"{k} {v:.3g}" if k in ("lr",) else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    extra = [k for k in record if k not in keys and k != "epoch" and "/" not in k]
    parts += [f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in extra]
    return "  ".join(parts)
