"""Engine overhead: ResNet-20 pure training steps vs the engine's full epoch on the same data.

Prints images/s and peak memory of the pure step, the engine's epoch time over (steps x pure step
time) (target <= 1.10x), and the effect of channels_last. The pure steps are the same model,
optimizer and schedule stepping on one resident batch, timed over as many steps as an epoch has,
so the ratio is what the engine adds: loading and augmenting the data, metrics, hooks. The data
are CIFAR-shaped random images written in CIFAR-10's genuine on-disk format and read by the
engine's own loader.

    python benchmarks/bench_engine.py [--images N] [--batch 128] [--device cpu]   # 20 steps an epoch (CUDA: 200)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import bionets  # noqa: F401
from bionets.bench import device_name, measure, positive, run_script, sync, table
from bionets.config import load_config
from bionets.data.fakes import write_cifar
from bionets.engine.distributed import init_distributed, parse_device
from bionets.engine.trainer import Trainer


def pure_steps(trainer: Trainer, steps: int, rounds: int) -> float:
    """Median time of ``steps`` bare training steps (forward, loss, backward, optimizer and schedule
    step) of the trainer's own model and optimizer on one batch that stays in memory."""
    model, opt, device = trainer.net, trainer.optimizer, trainer.device
    images, targets = next(iter(trainer.data.train))
    images, targets = images.to(device), targets.to(device)
    if trainer.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            with trainer.autocast():
                loss = torch.nn.functional.cross_entropy(model(images), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            trainer.scheduler.step_update(trainer.state.step)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=positive, default=None,
                   help="training images, i.e. steps per epoch x batch; default 20 steps on the CPU (a step "
                        "takes ~0.2 s there) and 200 on CUDA, where a 20-step epoch lets the epoch's fixed costs "
                        "(iterator, sampler, the final synchronize) weigh as much as 10%% of it (CIFAR-10 has "
                        "390 steps of 128)")
    p.add_argument("--batch", type=positive, default=128)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--epochs", type=positive, default=3, help="measured engine epochs (after one warm-up epoch)")
    args = p.parse_args(argv)
    device = parse_device(args.device, "--device")
    amp = "bf16" if device.type == "cuda" else "off"
    images = args.images or args.batch * (200 if device.type == "cuda" else 20)
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
        write_cifar(Path(tmp) / "data", classes=10, n_train=images, n_test=256)
        cfg = load_config(None, [
            "model.name=resnet20_cifar", "model.kwargs={}", "data.name=cifar10", f"data.root={tmp}/data",
            f"data.batch_size={args.batch}", f"train.epochs={args.epochs + 1}", "train.progress=false",
            f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}", f"train.device={args.device}",
            "optim.weight_decay=1e-4", "sched.warmup_epochs=0", f"out_dir={tmp}/runs", "name=bench"])
        trainer = Trainer(cfg, init_distributed(args.device), quiet=True)
        epochs = []
        for _ in range(args.epochs + 1):              # the first epoch warms up
            epochs.append(trainer.train_epoch()["epoch_time"])
            trainer.state.epoch += 1
        engine = statistics.median(epochs[1:])
        steps = trainer.steps_per_epoch
        pure = pure_steps(trainer, steps, args.epochs)
    ratio = engine / pure
    out = [f"device: {device_name(device)}; batch {args.batch}; {steps} steps per epoch; amp {amp}", "",
           table(rows, rows[0]), "",
           f"engine epoch {engine:.2f} s (median of {args.epochs}) vs {steps} pure steps {pure:.2f} s (the same model, "
           f"optimizer and schedule on one resident batch): ratio {ratio:.3f}x (target <= 1.10x); "
           f"engine {steps * args.batch / engine:.0f} images/s; channels_last {'on' if channels_last else 'off'}"]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    run_script(main)
