"""CUDA paths (AMP bf16/fp16, channels_last, DDP-free): skipped on machines without a GPU."""
import json

import pytest
import torch

from bionets.engine.trainer import train
from engine_helpers import fast_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_training_on_cuda(tmp_path, amp):
    cfg = fast_config(tmp_path, "model.name=resnet20_cifar", "model.kwargs={img_size: 8}", "train.epochs=2",
                      f"train.amp={amp}", "train.channels_last=true", "train.device=cuda", name=amp)
    summary = train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    assert summary["final_top1"] > 50
