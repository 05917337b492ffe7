"""DNRT's cost: RAA against GELU (ViT-Tiny, ResNet-20) and ReLU (ResNet-20), ARR's added step time.

    python benchmarks/bench_dnrt.py [--batch 32] [--device cpu] [--rounds 3] [--alternate 25] [--skip-compiled]
                                    [--vit-img 224] [--compile-mode reduce-overhead] [--cases vit,resnet-gelu]

RAA is timed eager and with ``compiled=True`` (the whole RAA fused by torch.compile; compiling is
done in the warm-up steps, not timed). Each model's cases are measured one after another in
interleaved rounds (the table), then stepped in turn, one step of each per round, in this process
(``--alternate N`` steps each; on a shared host the figure that varies least).

Targets (issue 3): RAA training step <= 1.15x the plain activation's; ARR adds <= 3%.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import timm
import torch

import bionets  # noqa: F401
from bionets.bench import (Timing, alternating_step_times, compiled, device_name, fastest, loss_with_hooks,
                           measure, paired_ratios, positive, run_script, table, train_step, verdict)
from bionets.conversion import convert
from bionets.engine.distributed import parse_device
from bionets.engine.model import use_channels_last


def raa_kernels(dev: torch.device) -> str:
    """Which kernels the eager RAA runs on ``dev`` (built here, if they build, before any timing)."""
    from bionets.layers import cpu_kernels, cuda_kernels
    from bionets.layers.raa import raa_triton
    if dev.type == "cuda":
        if cuda_kernels.ops("raa_cuda") is not None:
            return "its CUDA C++ operator"
        return "its Triton kernels" if raa_triton() is not None else "PyTorch operators"
    return "its C++ operator" if cpu_kernels.ops("raa_cpu") is not None else "PyTorch operators"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=positive, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--rounds", type=positive, default=3, help="measure every case this many times, interleaved; keep "
                   "each case's fastest")
    p.add_argument("--alternate", type=int, default=25, metavar="N",
                   help="also step every case in turn in this process, N steps each (0: skip)")
    p.add_argument("--vit-img", type=positive, default=32, help="ViT-Tiny's input side: 32 (patch 4, 64 tokens, the "
                   "CIFAR shape) or 224 (patch 16, 196 tokens, its ImageNet shape; for a GPU)")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile every whole model (plain, RAA, ARR) in this mode, as train.compile does; "
                        "drops the per-module RAA compiled case")
    p.add_argument("--cases", default="vit,resnet-gelu,resnet-relu",
                   help="comma-separated subset of: vit (ViT-Tiny, GELU), resnet-gelu (ResNet-20 with GELU), "
                        "resnet-relu (ResNet-20 with ReLU)")
    p.add_argument("--skip-compiled", action="store_true",
                   help="leave out RAA's torch.compile path (e.g. on a CPU machine without a C++ compiler)")
    args = p.parse_args(argv)
    dev = parse_device(args.device, "--device")
    amp = "bf16" if dev.type == "cuda" else "off"
    out = [f"device: {device_name(dev)}; batch {args.batch}; amp {amp}; channels_last where the engine uses it; "
           f"eager RAA through {raa_kernels(dev)}"]
    print(out[0], flush=True)
    patch = 4 if args.vit_img <= 64 else 16
    cases = {"vit": (f"vit_tiny (img {args.vit_img}, patch {patch})", "vit_tiny_patch16_224",
                     dict(img_size=args.vit_img, patch_size=patch), "GELU"),
             "resnet-gelu": ("resnet20_cifar", "resnet20_cifar", dict(act_layer="gelu"), "GELU"),
             "resnet-relu": ("resnet20_cifar", "resnet20_cifar", {}, "ReLU")}
    chosen = args.cases.split(",")
    if unknown_cases := sorted(set(chosen) - set(cases)):
        p.error(f"unknown case(s) {', '.join(unknown_cases)}; choose from {', '.join(cases)}")
    shown = len(out)
    for label, name, kwargs, act in (cases[c] for c in chosen):
        side = kwargs.get("img_size", 32)
        x = torch.randn(args.batch, 3, side, side, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        torch.manual_seed(0)
        plain = timm.create_model(name, num_classes=10, **kwargs).to(dev)
        cl = use_channels_last("auto", plain, dev)     # as the engine does: on for models with convolutions
        models = {f"{label} {act}": (plain, None)}
        variants = [("RAA", {"activation": "raa"})]
        if not (args.skip_compiled or args.compile_mode):
            variants.append(("RAA compiled", {"activation": {"compiled": True}}))
        for tag, kw in variants:
            models[f"{label} {tag}"] = (convert(copy.deepcopy(plain), **kw)[0].to(dev), None)
        model, report = convert(copy.deepcopy(plain), regularization={"weight": 10.0})
        model.to(dev)
        for h in report.hooks:
            h.attach(model)
        models[f"{label} {act} + ARR"] = (model, loss_with_hooks(model, report.hooks))
        if args.compile_mode:
            models = {f"{case} (whole model compiled, {args.compile_mode})": (compiled(m, args.compile_mode, cl), fn)
                      for case, (m, fn) in models.items()}
        best: dict[str, Timing] = {}
        for r in range(args.rounds):                   # interleaved rounds: a slow spell hits every case alike
            for case, (m, loss_fn) in models.items():
                t = measure(case, m, x, y, amp=amp, channels_last=cl, repeats=args.repeats, loss_fn=loss_fn,
                            peak=r == 0)
                best[case] = fastest(best.get(case), t)
        rows = list(best.values())
        out += ["", table(rows, rows[0])]
        if args.alternate:
            steps = {case: train_step(m, x, y, loss_fn=loss_fn, amp=amp, channels_last=cl)[0]
                     for case, (m, loss_fn) in models.items()}
            times = alternating_step_times(steps, dev, repeats=args.alternate)
            base = next(iter(times.values()))
            out += ["", f"stepped in turn in one process, {args.alternate} steps each (median ms; ratio of the medians; "
                    "round-by-round ratio: median and quartiles):"]
            for k, (case, ts) in enumerate(times.items()):
                low, mid, high = paired_ratios(ts, base)
                line = (f"- {case}: {statistics.median(ts):.1f} ms, {statistics.median(ts) / statistics.median(base):.3f}x; "
                        f"{mid:.3f}x ({low:.3f}-{high:.3f}x)")
                if k:                                      # against issue 3's targets
                    target = 1.03 if "+ ARR" in case else 1.15
                    line += f" ({verdict(mid, target)})"
                out.append(line)
        print("\n".join(out[shown:]), flush=True)          # each model as it finishes (a time limit keeps those done)
        shown = len(out)
    return "\n".join(out)


if __name__ == "__main__":
    run_script(main)
