"""Dit-CNN cost: training steps of Dit models against their plain twins, and the quadratic layer alone.

(a) Dit-ResNet-20 vs resnet20_cifar on a CIFAR-shaped batch (target step ratio <= 1.15); also both
    stepped in turn in one process (``--alternate``), which a drifting host disturbs least;
(b) QuadraticChannel alone, C=32 at 16x16 (Dit-ResNet's block): impl 'sym' (the C(C+1)/2 distinct
    products) vs 'full' (all C^2 products, the reference formulation) (target full/sym >= 1.5);
(c) Dit-ConvNeXt-T vs timm's convnext_tiny at 224 (target <= 1.35), and the layer alone at C=96,
    56x56, sym vs full (target >= 1.5);
(d) multiply-adds (FLOPs / 2, counted by torch.utils.flop_counter.FlopCounterMode on one image, with
    the in-place ``addmm_`` of the sym kernel added to its table; elementwise products and norms are
    not counted) and parameters of every registered Dit model, sym and full, beside its plain twin.

    python benchmarks/bench_dit.py [--device cpu|cuda] [--batch 128] [--convnext-batch 8] [--rounds 3] [--out FILE]
                                   [--compile-mode reduce-overhead] [--cuda-strategy blocks] [--quad-impl full]

On CUDA every case runs under AMP bf16, on CPU in float32; channels_last on both, as ``bionets train``
runs conv models (``--channels-last off`` for NCHW).
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import bionets  # noqa: F401  (registers the Dit models)
from bionets.bench import (Timing, alternating_step_times, compiled, device_name, fastest, measure, paired_ratios,
                           positive, run_script, table, train_step, verdict, writable)
from bionets.engine.distributed import parse_device
from bionets.layers.quadratic import CUDA_STRATEGIES, QuadraticChannel, set_cuda_strategy


def plain_twin(name: str) -> str:
    """The plain model a Dit model extends: dit_resnet20 -> resnet20_cifar, dit_convnext_tiny -> convnext_tiny."""
    base = name.removeprefix("dit_")
    return f"{base}_cifar" if base.startswith("resnet") else base


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # FlopCounterMode counts addmm but not addmm_


def macs(model: torch.nn.Module) -> int:
    """Multiply-adds of one forward pass on one image at the model's input size (FLOPs / 2), counted
    on the 'meta' device: there the quadratic term runs its PyTorch ops, which FlopCounterMode sees
    (the CPU's C++ kernels are opaque to it: counted on the CPU, the sym term came out as 0)."""
    model = copy.deepcopy(model).to("meta").eval()
    size = model.pretrained_cfg["input_size"]
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops})
    with counter, torch.no_grad():
        model(torch.randn(1, *size, device="meta"))
    return counter.get_total_flops() // 2


def _square_loss(out: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def _model_and_batch(name: str, batch: int, img: int, classes: int, device: str, quad_impl: str = "sym"):
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    kwargs = {"img_size": img} if plain_twin(name).endswith("_cifar") else {}   # the CIFAR family sizes its Dit LayerNorm
    if name.startswith("dit_"):
        kwargs["quad_impl"] = quad_impl
    return timm.create_model(name, num_classes=classes, **kwargs).to(device), x, y


def _measure(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, opts: dict,
             **kwargs) -> Timing:
    """``measure`` with the options of this run, the model compiled first if ``--compile-mode`` asks."""
    timing = {k: v for k, v in opts.items() if k not in ("compile_mode", "quad_impl")}
    return measure(name, compiled(model, opts["compile_mode"], opts["channels_last"]), x, y, **timing, **kwargs)


def model_case(name: str, batch: int, img: int, classes: int, device: str, opts: dict) -> Timing:
    model, x, y = _model_and_batch(name, batch, img, classes, device, opts["quad_impl"])
    return _measure(f"{name} step, batch {batch} x 3 x {img} x {img}", model, x, y, opts)


def alternating_ratio(names: tuple[str, str], batch: int, img: int, classes: int, device: str, opts: dict,
                      repeats: int, target: float) -> str:
    """Both models in this process, stepped in turn: the median step time of each, their ratio, and
    the round-by-round ratio (median and quartiles) against the target."""
    steps = {}
    for name in names:
        model, x, y = _model_and_batch(name, batch, img, classes, device, opts["quad_impl"])
        model = compiled(model, opts["compile_mode"], opts["channels_last"])
        steps[name] = train_step(model, x, y, amp=opts["amp"], channels_last=opts["channels_last"])[0]
    times = alternating_step_times(steps, torch.device(device), warmup=opts["warmup"], repeats=repeats)
    base, new = (statistics.median(times[n]) for n in names)
    low, mid, high = paired_ratios(times[names[1]], times[names[0]])
    return (f"stepped in turn in one process, {repeats} steps each: median {base:.1f} ms vs {new:.1f} ms, "
            f"ratio {new / base:.3f}x; round by round: median {mid:.3f}x ({verdict(mid, target)}), "
            f"quartiles {low:.3f}-{high:.3f}x")


def layer_case(channels: int, size: int, batch: int, impl: str, device: str, opts: dict) -> Timing:
    # the input needs its gradient, as inside a network (the backward computes dL/dx as well as dL/dQ)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    layer = QuadraticChannel(channels, impl=impl).to(device)
    return _measure(f"QuadraticChannel({channels}, impl={impl}) on {batch} x {channels} x {size} x {size}",
                    layer, x, None, opts, loss_fn=_square_loss)


def run_case(isolate: bool, fn, *args) -> Timing:
    """``fn(*args)``, in a fresh process if ``isolate``: on CPU, peak memory is the rise of the
    process's resident set, which memory freed by an earlier case would hide."""
    if not isolate:
        return fn(*args)
    with mp.get_context("spawn").Pool(1) as pool:  # not fork: OpenMP threads do not survive it
        return pool.apply(fn, args)


def section(title: str, rows: list[Timing], target: float) -> str:
    """A table of (base, new) and the step-time ratio new/base against its target."""
    ratio = rows[1].ratio(rows[0])
    faster = f"; {1 / ratio:.2f}x faster" if target < 1 else ""
    return (f"### {title}\n\n{table(rows, rows[0])}\n\n"
            f"step ratio {ratio:.3f}x ({verdict(ratio, target)}{faster})\n")


def macs_table(models: list[str]) -> str:
    out = ["| Dit model | input | MACs sym | MACs full | plain twin | twin MACs | extra sym / full | params "
           "| twin params |",
           "|---|---|---|---|---|---|---|---|---|"]
    for dit in models:
        twin = timm.create_model(plain_twin(dit))
        sym, full = (timm.create_model(dit, quad_impl=impl) for impl in ("sym", "full"))
        a, b, t = macs(sym), macs(full), macs(twin)
        params = [sum(p.numel() for p in m.parameters()) for m in (sym, twin)]
        out.append(f"| {dit} | {'x'.join(map(str, sym.pretrained_cfg['input_size'][1:]))} | {a / 1e6:,.1f} M | "
                   f"{b / 1e6:,.1f} M | {plain_twin(dit)} | {t / 1e6:,.1f} M | {(a - t) / 1e6:,.1f} / "
                   f"{(b - t) / 1e6:,.1f} M | {params[0]:,} | {params[1]:,} |")
    return "\n".join(out)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--batch", type=positive, default=128, help="CIFAR batch (a, b)")
    p.add_argument("--img", type=positive, default=32, help="CIFAR image side (a)")
    p.add_argument("--convnext-batch", type=positive, default=None, help="ConvNeXt batch (c); default 8 on CPU, 64 on CUDA")
    p.add_argument("--convnext-img", type=positive, default=224,
                   help="ConvNeXt image side (c); the layer alone runs at img/4")
    p.add_argument("--skip-convnext", action="store_true", help="leave out (c)")
    p.add_argument("--macs-models", default="dit_*", help="glob of the Dit models for (d); '' skips (d)")
    p.add_argument("--skip-resnet", action="store_true", help="leave out (a) and (b)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--alternate", type=int, default=25, metavar="N",
                   help="(a) also steps both models in turn in one process, N steps each (0: skip)")
    p.add_argument("--rounds", type=positive, default=3,
                   help="measure base and new this many times, alternating; keep each one's fastest")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every case in this process (default on CPU: one fresh process per case)")
    p.add_argument("--channels-last", choices=("on", "off"), default="on",
                   help="memory format of every case: on (default) is how 'bionets train' runs conv models on any "
                        "device")
    p.add_argument("--cuda-strategy", choices=CUDA_STRATEGIES, default="auto",
                   help="how the sym form runs on CUDA: 'auto' (default: eager 'outer' up to 64 channels, else "
                        "'fused' where Triton is installed, up to 128 channels), 'blocks' (PyTorch's batched "
                        "products), 'fused' (Triton kernels), 'gather' or 'outer' (plain expressions of C(C+1)/2 "
                        "or all C^2 products, autograd's own backward)")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile every model and layer in this mode, as train.compile does (compiling is "
                        "done in the warm-up steps); 'reduce-overhead' replays CUDA graphs")
    p.add_argument("--quad-impl", choices=("sym", "full"), default="sym",
                   help="quadratic form of the Dit models in (a) and (c): 'sym' (default) or 'full' (all C^2 products)")
    p.add_argument("--out", type=writable, help="also write the report to this Markdown file")
    args = p.parse_args(argv)
    set_cuda_strategy(args.cuda_strategy)
    device = parse_device(args.device, "--device")
    cuda = device.type == "cuda"
    cl = args.channels_last == "on"
    opts = {"amp": "bf16" if cuda else "off", "channels_last": cl, "warmup": args.warmup, "repeats": args.repeats,
            "compile_mode": args.compile_mode, "quad_impl": args.quad_impl}
    isolate = not cuda and not args.no_isolate
    parts = [f"# Dit-CNN benchmark\n\ndevice: {device_name(device)}; amp {opts['amp']}; channels_last {cl}; "
             f"torch {torch.__version__}; median of {args.repeats} after {args.warmup} warm-up, fastest of "
             f"{args.rounds} alternating rounds; Dit models' quad_impl {args.quad_impl}; CUDA strategy {args.cuda_strategy}; "
             f"torch.compile {args.compile_mode or 'off'}; "
             f"{'one process per case' if isolate else 'one process'}\n"]
    print(parts[0], flush=True)

    def compare(title: str, fn, base: tuple, new: tuple, target: float) -> None:
        best: list[Timing | None] = [None, None]
        for r in range(args.rounds):          # interleaved: a slow spell of the host hits both cases alike
            for k, case in enumerate((base, new)):
                t = run_case(isolate, fn, *case[:-1], {**case[-1], "peak": r == 0})   # peak memory once a case
                best[k] = fastest(best[k], t)
        parts.append(section(title, best, target))
        print(parts[-1], flush=True)          # each section as it finishes (a time limit keeps those done)

    dev, b, img = str(device), args.batch, args.img
    if not args.skip_resnet:
        compare("(a) Dit-ResNet-20 vs its plain twin", model_case, ("resnet20_cifar", b, img, 10, dev, opts),
                ("dit_resnet20", b, img, 10, dev, opts), 1.15)
        if args.alternate:
            parts[-1] += "\n" + alternating_ratio(("resnet20_cifar", "dit_resnet20"), b, img, 10, dev, opts,
                                                  args.alternate, 1.15) + "\n"
            print(parts[-1].rsplit("\n", 2)[-2], flush=True)
        side = max(1, img // 2)
        compare("(b) quadratic layer of Dit-ResNet: sym vs full (target: sym >= 1.5x faster)", layer_case,
                (32, side, b, "full", dev, opts), (32, side, b, "sym", dev, opts), 1 / 1.5)
    if not args.skip_convnext:
        b, img = args.convnext_batch or (64 if cuda else 8), args.convnext_img
        compare("(c) Dit-ConvNeXt-T vs timm's convnext_tiny", model_case, ("convnext_tiny", b, img, 1000, dev, opts),
                ("dit_convnext_tiny", b, img, 1000, dev, opts), 1.35)
        compare("(c) quadratic layer of Dit-ConvNeXt-T: sym vs full (target: sym >= 1.5x faster)", layer_case,
                (96, img // 4, b, "full", dev, opts), (96, img // 4, b, "sym", dev, opts), 1 / 1.5)
    if args.macs_models:
        import fnmatch
        models = [m for m in timm.list_models(args.macs_models) if fnmatch.fnmatch(m, "dit_*")]
        parts.append("### (d) multiply-adds per image (FlopCounterMode FLOPs / 2) and parameters\n\n"
                     + macs_table(models) + "\n")
        print(parts[-1], flush=True)
    text = "\n".join(parts)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    run_script(main)
