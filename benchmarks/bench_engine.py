"""Engine overhead: ResNet-20 pure training steps vs the engine's full epoch on the same data.

Prints images/s and peak memory of the pure step, the engine's epoch time over (steps x pure step
time) (target <= 1.10x), and the effect of channels_last. The data are CIFAR-shaped random images
written in CIFAR-10's genuine on-disk format and read by the engine's own loader.

    python benchmarks/bench_engine.py [--images 2560] [--batch 128] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch

import bionets  # noqa: F401
from bionets.bench import device_name, measure, table
from bionets.config import load_config
from bionets.data.fakes import write_cifar
from bionets.engine.trainer import train


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp = "bf16" if device.type == "cuda" else "off"
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows = []
    for cl in (False, True):
        model = timm.create_model("resnet20_cifar", num_classes=10).to(device)
        rows.append(measure(f"resnet20_cifar step, channels_last={cl}", model, x, y, amp=amp, channels_last=cl,
                            repeats=args.repeats))
    best = min(rows, key=lambda r: r.step_ms)
    channels_last = best is rows[1]
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp) / "data", classes=10, n_train=args.images, n_test=256)
        cfg = load_config(None, [
            "model.name=resnet20_cifar", "model.kwargs={}", "data.name=cifar10", f"data.root={tmp}/data",
            f"data.batch_size={args.batch}", "train.epochs=2", "train.progress=false", f"train.amp={amp}",
            f"train.channels_last={str(channels_last).lower()}", f"train.device={args.device}",
            "optim.weight_decay=1e-4", "sched.warmup_epochs=0", f"out_dir={tmp}/runs", "name=bench"])
        train(cfg, quiet=True)
        records = [json.loads(line) for line in (Path(tmp) / "runs" / "bench" / "metrics.jsonl").read_text().splitlines()]
    steps = args.images // args.batch
    epoch = records[-1]["epoch_time"]   # the second epoch: no warm-up inside
    ratio = epoch / (steps * best.step_ms / 1e3)
    out = [f"device: {device_name(device)}; batch {args.batch}; {steps} steps per epoch; amp {amp}", "",
           table(rows, rows[0]), "",
           f"engine epoch {epoch:.2f} s vs {steps} pure steps {steps * best.step_ms / 1e3:.2f} s: "
           f"ratio {ratio:.3f}x (target <= 1.10x); engine {records[-1]['images_per_s']:.0f} images/s; "
           f"channels_last {'on' if channels_last else 'off'}"]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
