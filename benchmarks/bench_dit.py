"""Dit-CNN cost: training steps of Dit models against their plain twins, and the quadratic layer alone.

(a) Dit-ResNet-20 vs resnet20_cifar on a CIFAR-shaped batch (target step ratio <= 1.15);
(b) QuadraticChannel alone, C=32 at 16x16 (Dit-ResNet's block): impl 'sym' (the C(C+1)/2 distinct
    products) vs 'full' (all C^2 products, the reference formulation) (target full/sym >= 1.5);
(c) Dit-ConvNeXt-T vs timm's convnext_tiny at 224 (target <= 1.35), and the layer alone at C=96,
    56x56, sym vs full (target >= 1.5);
(d) multiply-adds (FLOPs / 2, counted by torch.utils.flop_counter.FlopCounterMode on one image, with
    the in-place ``addmm_`` of the sym kernel added to its table; elementwise products and norms are
    not counted) and parameters of every registered Dit model, sym and full, beside its plain twin.

    python benchmarks/bench_dit.py [--device cpu|cuda] [--batch 128] [--convnext-batch 8] [--out FILE]

On CUDA every case runs under AMP bf16 with channels_last; on CPU in float32, memory as is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import bionets  # noqa: F401  (registers the Dit models)
from bionets.bench import device_name, measure, table
from bionets.layers.quadratic import QuadraticChannel


def plain_twin(name: str) -> str:
    """The plain model a Dit model extends: dit_resnet20 -> resnet20_cifar, dit_convnext_tiny -> convnext_tiny."""
    base = name.removeprefix("dit_")
    return f"{base}_cifar" if base.startswith("resnet") else base


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # FlopCounterMode counts addmm but not addmm_


def macs(model: torch.nn.Module) -> int:
    """Multiply-adds of one forward pass on one image at the model's input size (FLOPs / 2)."""
    model.eval()
    size = model.pretrained_cfg["input_size"]
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops})
    with counter, torch.no_grad():
        model(torch.randn(1, *size))
    return counter.get_total_flops() // 2


def _square_loss(out: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def model_pair(dit: str, batch: int, img: int, classes: int, device, opts: dict) -> list:
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    rows = []
    for name in (plain_twin(dit), dit):
        model = timm.create_model(name, num_classes=classes).to(device)
        rows.append(measure(f"{name} step, batch {batch} x 3 x {img} x {img}", model, x, y, **opts))
    return rows


def layer_pair(channels: int, size: int, batch: int, device, opts: dict) -> list:
    x = torch.randn(batch, channels, size, size, device=device)
    rows = []
    for impl in ("full", "sym"):
        layer = QuadraticChannel(channels, impl=impl).to(device)
        rows.append(measure(f"QuadraticChannel({channels}, impl={impl}) on {batch} x {channels} x {size} x {size}",
                            layer, x, loss_fn=_square_loss, **opts))
    return rows


def section(title: str, rows: list, target: str) -> str:
    ratio = rows[1].step_ms / rows[0].step_ms
    return f"### {title}\n\n{table(rows, rows[0])}\n\nstep ratio {ratio:.3f}x ({target})\n"


def macs_table(models: list[str]) -> str:
    out = ["| Dit model | input | MACs sym | MACs full | plain twin | twin MACs | extra sym / full | params | twin params |",
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128, help="CIFAR batch (a, b)")
    p.add_argument("--img", type=int, default=32, help="CIFAR image side (a)")
    p.add_argument("--convnext-batch", type=int, default=None, help="ConvNeXt batch (c); default 8 on CPU, 64 on CUDA")
    p.add_argument("--convnext-img", type=int, default=224, help="ConvNeXt image side (c); the layer alone runs at img/4")
    p.add_argument("--skip-convnext", action="store_true", help="leave out (c)")
    p.add_argument("--macs-models", default="dit_*", help="glob of the Dit models for (d); '' skips (d)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the report to this Markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    opts = {"amp": "bf16" if cuda else "off", "channels_last": cuda, "warmup": args.warmup, "repeats": args.repeats}
    cn_batch = args.convnext_batch or (64 if cuda else 8)
    parts = [f"# Dit-CNN benchmark\n\ndevice: {device_name(device)}; amp {opts['amp']}; "
             f"channels_last {cuda}; torch {torch.__version__}; median of {args.repeats} after {args.warmup} warm-up\n"]
    parts.append(section("(a) Dit-ResNet-20 vs its plain twin", model_pair("dit_resnet20", args.batch, args.img, 10, device, opts),
                         "target <= 1.15x"))
    q_side = max(1, args.img // 2)
    layer = layer_pair(32, q_side, args.batch, device, opts)
    parts.append(section("(b) quadratic layer of Dit-ResNet: sym vs full", layer,
                         f"sym/full; full/sym = {layer[0].step_ms / layer[1].step_ms:.2f}x, target >= 1.5x"))
    if not args.skip_convnext:
        parts.append(section("(c) Dit-ConvNeXt-T vs timm's convnext_tiny",
                             model_pair("dit_convnext_tiny", cn_batch, args.convnext_img, 1000, device, opts),
                             "target <= 1.35x"))
        layer = layer_pair(96, args.convnext_img // 4, cn_batch, device, opts)
        parts.append(section("(c) quadratic layer of Dit-ConvNeXt-T: sym vs full", layer,
                             f"sym/full; full/sym = {layer[0].step_ms / layer[1].step_ms:.2f}x, target >= 1.5x"))
    if args.macs_models:
        import fnmatch
        models = [m for m in timm.list_models(args.macs_models) if fnmatch.fnmatch(m, "dit_*")]
        parts.append("### (d) multiply-adds per image (FlopCounterMode FLOPs / 2) and parameters\n\n"
                     + macs_table(models) + "\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
