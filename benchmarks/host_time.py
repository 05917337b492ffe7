"""Host time per call of RAA and the quadratic layer (forward and backward) against their plain twins.

On a GPU the eager steps of CIFAR-sized models are bound by the host (issues 3 and 6 miss their
eager targets there), so this probe times single modules the way those steps call them: bf16
autocast on CUDA, channels_last, batch 128, 200 calls of ``module(x).float().sum().backward()``;
"host" is the wall time before the final sync, "peak" a call's peak memory. It then profiles 5
calls of RAA and of the quadratic layer (self CPU time per operator, the autograd functions' own
Python included), and splits one RAA call and one ARR loss into their parts (:func:`raa_parts`, :func:`arr_parts`)::

    python benchmarks/host_time.py [--device cuda|cpu] [--batch 128] [--calls 200]
"""
import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bionets.bench import positive, run_script, step_peak_mb
from bionets.engine.distributed import parse_device
from bionets.layers.quadratic import QuadraticChannel, set_cuda_strategy
from bionets.layers.quadratic_sym import triton_module
from bionets.layers import raa as raa_module
from bionets.layers.raa import RAA


def per_call_ms(module: nn.Module, x: torch.Tensor, calls: int):
    """(host ms, total ms) per forward+backward, and the call itself."""
    cuda = x.is_cuda

    def call():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            y = module(x)
        y.float().sum().backward()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(min(10, calls)):
        call()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - start) / calls * 1e3
    sync()
    return host, (time.perf_counter() - start) / calls * 1e3, call


class _PythonRelu(torch.autograd.Function):
    """ReLU as a Python autograd function: what such a function costs by itself, on this device's
    autograd thread (CUDA's backward runs on a worker thread that takes the GIL for it)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.aten.threshold_backward(grad, ctx.saved_tensors[0], 0)


def host_us(fn, calls: int, cuda: bool) -> float:
    """Host microseconds per call of ``fn`` (after 10 warm-up calls; the wall time before the sync)."""
    for _ in range(10):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    if cuda:
        torch.cuda.synchronize()
    return host


def raa_parts(dev: torch.device, batch: int, calls: int) -> list[str]:
    """Host time of RAA's (ReLU form) parts on a 16-channel 32x32 channels_last map, float32: where a
    call's time goes beyond its kernels. The Triton rows need CUDA and Triton."""
    cuda = dev.type == "cuda"
    x = torch.randn(batch, 16, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    raa = RAA(16, base="relu").to(dev)
    w = raa.vc
    v, c = (t.detach() for t in raa_module.split_shift(w))
    parts = {"torch.relu forward": lambda: torch.relu(x),
             "ReLU forward + backward": lambda: torch.relu(xg).backward(g),
             "ReLU as a Python autograd function, forward + backward": lambda: _PythonRelu.apply(xg).backward(g),
             "RAA forward (graph kept)": lambda: raa(xg),
             "RAA forward + backward": lambda: raa(xg).backward(g),
             "RAA's Python autograd function (Triton kernels on CUDA), forward + backward":
                 lambda: raa_module._RaaVector.apply(xg, w, 1, "relu").backward(g)}
    own = raa_module._own_kernels(x, w, 1)
    if own is not None:
        parts["RAA's own operator (C++ autograd), forward + backward"] = lambda: own.raa.default(xg, w, 1, True).backward(g)
        parts["RAA's own operator, forward only (graph kept)"] = lambda: own.raa.default(xg, w, 1, True)
    kernels = raa_module.raa_triton() if cuda else None
    if kernels is not None:
        layout = kernels.ncp_layout(x, 1)
        y, s = kernels.forward(x, v, c, layout, relu=True)
        parts["raa_triton.forward (2 allocations, 1 launch)"] = lambda: kernels.forward(x, v, c, layout, relu=True)
        parts["raa_triton.backward (2 allocations, 1 launch, 1 sum)"] = (
            lambda: kernels.backward(x, g, s, v, layout, relu=True))
        parts["raa_triton.forward's launch alone"] = lambda: kernels._raa_forward_kernel[(1,)](
            x, v, c, y, s, 1, 16, 1, 16, 1, 0, HAS_V=True, RELU=True, BLOCK_M=1, BLOCK_C=16)
    lines = [f"RAA's parts, 16 channels, 32x32, batch {batch}, float32, {dev}: host us per call"]
    print(lines[0], flush=True)
    for name, fn in parts.items():
        lines.append(f"  {name}: {host_us(fn, calls, cuda):.1f} us")
        print(lines[-1], flush=True)
    return lines


def arr_parts(dev: torch.device, batch: int, calls: int) -> list[str]:
    """Host time of ARR's parts (10 classes, the ``paper`` form), for one hooked layer of 64 features
    (ResNet-20's classifier input) and twelve of 192 (ViT-Tiny's blocks): the whole loss forward and
    backward, the same with its PyTorch operators in place of its own operator and the Triton kernel, the loss expression
    alone, the Triton kernel alone (CUDA), and a Linear layer with and without a forward pre-hook
    (how ARR captures a CNN's classifier input)."""
    from bionets.layers import arr as arr_module
    from bionets.layers.arr import ArrMemory, arr_loss
    cuda = dev.type == "cuda"
    lines = [f"ARR's parts, batch {batch}, 10 classes, {dev}: host us per call"]
    print(lines[0], flush=True)
    for layers, dim in ((1, 64), (12, 192)):
        memory = ArrMemory(layers, 10, dim).to(dev)
        rs = [torch.randn(batch, dim, device=dev, requires_grad=True) for _ in range(layers)]
        y = torch.randint(0, 10, (batch,), device=dev)
        m = torch.randn(layers, batch, dim, device=dev)

        def with_operators():
            scan, own = arr_module._scan_on_gpu, arr_module._own_operator
            arr_module._scan_on_gpu = arr_module._own_operator = lambda *args, **kwargs: None
            try:
                arr_loss(memory, rs, y, weight=1.0, momentum=0.1).backward()
            finally:
                arr_module._scan_on_gpu, arr_module._own_operator = scan, own

        linear = nn.Linear(dim, 10).to(dev)
        hooked = nn.Linear(dim, 10).to(dev)
        hooked.register_forward_pre_hook(lambda module, args: None)
        parts = {"arr_loss (ARR's own operator where built), forward + backward":
                     lambda: arr_loss(memory, rs, y, weight=1.0, momentum=0.1).backward(),
                 "arr_loss, forward": lambda: arr_loss(memory, rs, y, weight=1.0, momentum=0.1),
                 "arr_loss with the PyTorch operators, forward + backward": with_operators,
                 "the loss expression alone (stack, |r - m|.mean()), forward + backward":
                     lambda: (1.0 * (torch.stack([r.float() for r in rs]) - m).abs().mean()).backward(),
                 "Linear forward": lambda: linear(rs[0]),
                 "Linear with a forward pre-hook, forward": lambda: hooked(rs[0])}
        kernels = arr_module.triton_kernels("arr_triton") if cuda else None
        if kernels is not None:
            stacked = torch.stack([r.detach() for r in rs])
            parts["the Triton kernel alone (class_means)"] = lambda: kernels.class_means(
                memory.mean, memory.seen, stacked, y, 0.1, after=False, update=True)
        lines.append(f"  {layers} layer(s) of {dim} features:")
        print(lines[-1], flush=True)
        for name, fn in parts.items():
            lines.append(f"    {name}: {host_us(fn, calls, cuda):.1f} us")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--batch", type=positive, default=128)
    p.add_argument("--calls", type=positive, default=200)
    args = p.parse_args(argv)
    dev = parse_device(args.device, "--device")
    lines = []
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for c, side in ((16, 32), (64, 8)):
        x = torch.randn(args.batch, c, side, side, device=dev).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        modules = {"ReLU": nn.ReLU(), "GELU": nn.GELU(), "RAA relu": RAA(c, base="relu"), "RAA gelu": RAA(c, base="gelu"),
                   "conv3x3": nn.Conv2d(c, c, 3, padding=1, bias=False), "QuadraticChannel": QuadraticChannel(c)}
        if dev.type == "cuda":        # the default is 'outer' eager; the other strategies beside it
            for strategy in ("fused", "gather") if triton_module() is not None else ("gather",):
                modules[f"QuadraticChannel ('{strategy}')"] = QuadraticChannel(c)
        calls = {}
        for name, module in modules.items():
            module = module.to(dev).to(memory_format=torch.channels_last)
            set_cuda_strategy(name.split("'")[1] if "'" in name else "auto")
            try:
                host, total, calls[name] = per_call_ms(module, x, args.calls)
                peak = step_peak_mb(calls[name], dev)          # (under the strategy the call was timed with)
            finally:
                set_cuda_strategy("auto")
            lines.append(f"{c} channels, {side}x{side}, {name}: {host:.3f} ms host, {total:.3f} ms in all per call, "
                         f"peak {peak:.0f} MB")
            print(lines[-1], flush=True)
        for name in ("RAA relu", "QuadraticChannel"):
            with profile(activities=acts) as prof:
                for _ in range(5):
                    calls[name]()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            lines += ["", f"{name}, {c} channels, {side}x{side}: 5 calls",
                      prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=45)]
            print("\n".join(lines[-3:]), flush=True)
    lines += ["", *raa_parts(dev, args.batch, args.calls), "", *arr_parts(dev, args.batch, args.calls)]
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)
