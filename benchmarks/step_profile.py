"""Where a training step's host time goes: a plain model's step against its twins with RAA, ARR or
the quadratic layer, operator by operator (torch.profiler, self CPU time per step; on a GPU also
each kernel's GPU time).

On a GPU the eager steps of CIFAR-sized models wait on the host, so what a mechanism adds to the
step is what it adds here: each case's wall time and peak memory per step, its kernel launches per step, and the
operators whose host time differs most from the plain model's::

    python benchmarks/step_profile.py [--device cuda] [--cases resnet-gelu,resnet-relu,vit,dit] [--steps 10]
"""
from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from dataclasses import dataclass

import timm
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import bionets  # noqa: F401
from bionets.bench import loss_with_hooks, positive, run_script, step_peak_mb, train_step
from bionets.conversion import convert
from bionets.engine.distributed import parse_device
from bionets.engine.model import use_channels_last
from bionets.errors import BionetsError


CASES = ("resnet-gelu", "resnet-relu", "vit", "dit")


def models_of(case: str, dev: torch.device) -> dict:
    """{label: (model, loss_fn)}: the plain model first, then its twins."""
    torch.manual_seed(0)
    if case == "dit":
        return {"resnet20_cifar": (timm.create_model("resnet20_cifar", num_classes=10).to(dev), None),
                "dit_resnet20": (timm.create_model("dit_resnet20", num_classes=10).to(dev), None)}
    if case == "vit":          # ViT-Tiny as bench_dnrt.py's: 32x32 images, patch 4, GELU
        plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
    else:
        plain = timm.create_model("resnet20_cifar", num_classes=10, **({"act_layer": "gelu"} if case == "resnet-gelu" else {}))
    plain.to(dev)
    arr, report = convert(copy.deepcopy(plain), regularization={"weight": 10.0})
    for h in report.hooks:
        h.attach(arr)
    return {case: (plain, None), f"{case} RAA": (convert(copy.deepcopy(plain), activation="raa")[0].to(dev), None),
            f"{case} + ARR": (arr.to(dev), loss_with_hooks(arr, report.hooks))}


@dataclass
class StepProfile:
    wall_ms: float                       # a step, timed without the profiler
    host_us: dict[str, float]            # operator -> self CPU us a step
    gpu_us: dict[str, float]             # operator or kernel -> self GPU us a step
    calls: dict[str, float]              # operator -> calls a step
    launches: int                        # kernel launches a step
    peak_mb: float                       # the step's peak memory above its start

    @property
    def busy_ms(self) -> float:
        """The GPU's busy time a step: the wall time exceeds it where the step waits on the host."""
        return sum(self.gpu_us.values()) / 1e3


def per_step(model, loss_fn, x, y, dev, steps: int) -> StepProfile:
    cl = use_channels_last("auto", model, dev)
    step, _ = train_step(model, x, y, loss_fn=loss_fn, amp="bf16" if dev.type == "cuda" else "off", channels_last=cl)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(20):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / steps * 1e3
    peak = step_peak_mb(step, dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    host, gpu, calls = defaultdict(float), defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        host[e.key] += e.self_cpu_time_total / steps
        calls[e.key] += e.count / steps
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
            # the kernels themselves: a CPU operator's device time repeats its kernels' time
            gpu[e.key] += e.self_device_time_total / steps
    launches = round(sum(calls.get(k, 0) for k in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")))
    return StepProfile(wall, dict(host), dict(gpu), dict(calls), launches, peak)


def largest_differences(twin: dict[str, float], base: dict[str, float], top: int) -> list[tuple[str, float]]:
    diff = {k: twin.get(k, 0.0) - base.get(k, 0.0) for k in set(twin) | set(base)}
    return sorted(((k, d) for k, d in diff.items() if d), key=lambda kd: -abs(kd[1]))[:top]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--cases", default="resnet-gelu,dit", help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--batch", type=positive, default=128)
    p.add_argument("--steps", type=positive, default=10)
    p.add_argument("--top", type=positive, default=12, help="operators listed per twin")
    args = p.parse_args(argv)
    dev = parse_device(args.device, "--device")
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        raise BionetsError(f"--cases {args.cases}: the cases are {', '.join(CASES)} (it profiled a ReLU ResNet-20 for "
                           "any other name)")
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    lines = []
    for case in cases:
        shown = len(lines)
        runs = {label: per_step(m, fn, x, y, dev, args.steps) for label, (m, fn) in models_of(case, dev).items()}
        (base_label, base), *twins = runs.items()
        cuda = dev.type == "cuda"                 # (a CPU step launches no kernels, busies no GPU)
        lines.append(f"{base_label}: {base.wall_ms:.2f} ms a step, peak {base.peak_mb:.0f} MB"
                     + (f", GPU busy {base.busy_ms:.2f} ms, {base.launches} kernel launches" if cuda else ""))
        for label, twin in twins:
            gpu = (f", GPU busy {twin.busy_ms:.2f} ms, {twin.launches} kernel launches "
                   f"({twin.launches - base.launches:+d})") if cuda else ""
            lines.append(f"{label}: {twin.wall_ms:.2f} ms a step ({twin.wall_ms / base.wall_ms:.3f}x), peak "
                         f"{twin.peak_mb:.0f} MB{gpu}; "
                         "host us a step by operator, against the plain model:")
            for k, d in largest_differences(twin.host_us, base.host_us, args.top):
                lines.append(f"    {d:+8.1f} us  {twin.calls.get(k, 0) - base.calls.get(k, 0):+6.1f} calls  {k[:70]}")
            if cuda:
                lines.append("  GPU us a step by kernel, against the plain model:")
                lines += [f"    {d:+8.1f} us  {k[:80]}" for k, d in largest_differences(twin.gpu_us, base.gpu_us, args.top)]
        print("\n".join(lines[shown:]), flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)
