"""STDS cost and pay-off: the reparameterization's training-step cost, and sparse inference after export.

(a) SEW ResNet-18 (IF neurons, T steps, small input) training step with every conv reparameterized
    by STDS (stmod, D > 0 so the soft threshold really cuts) against the same model without it
    (target step ratio <= 1.10);
(b) the CIFAR SNN's 16384 -> 2048 spiking 1x1 conv (90% of its weights) exported at >= 95%
    sparsity: dense matmul against a ``torch.sparse`` CSR matmul on a batch of spikes (T x batch
    rows, the firing rate of the layer's input), per sparsity level;
(c) the whole exported CIFAR SNN in inference, its two 1x1 convs dense vs CSR.

    python benchmarks/bench_stds.py [--device cpu|cuda] [--inputs 4x64,8x112] [--T 4] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import warnings
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

import bionets  # noqa: F401  (registers the spiking models)
from bionets.bench import (Timing, alternating_step_ms, device_name, fastest, measure, positive, run_script, table,
                           verdict, writable)
from bionets.engine.distributed import parse_device
from bionets.errors import BionetsError
from bionets.layers.stds import apply_stds, export, set_threshold, sparsity


def best_of(rounds: int, stds: str | None, batch: int, img: int, T: int, device: str, opts: dict) -> Timing:
    """The fastest of ``rounds`` measurements (a shared CPU's noise hits cases unevenly), with the
    peak memory of the first."""
    best = None
    for r in range(rounds):
        best = fastest(best, sew_case(stds, batch, img, T, device, {**opts, "peak": r == 0}))
    return best


def run_case(isolate: bool, fn, *args) -> Timing:
    """``fn(*args)``, in a fresh process if ``isolate``: on CPU, peak memory is the rise of the
    process's resident set, which memory freed by an earlier case would hide."""
    if not isolate:
        return fn(*args)
    with mp.get_context("spawn").Pool(1) as pool:  # not fork: OpenMP threads do not survive it
        return pool.apply(fn, args)


def _square_loss(out: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def sew_case(stds: str | None, batch: int, img: int, T: int, device: str, opts: dict) -> Timing:
    torch.manual_seed(0)
    model = timm.create_model("sew_resnet18", num_classes=1000, T=T).to(device)
    if stds:
        apply_stds(model, stds, 0.0, types=["conv"])
        set_threshold(model, 0.01)   # about a fifth of the kaiming-initialized weights fall in the flat region
    x = torch.randn(batch, 3, img, img, device=device)
    name = f"sew_resnet18{f' + STDS {stds}' if stds else ''}, batch {batch} x 3 x {img} x {img}, T {T}"
    return measure(name, model, x, loss_fn=_square_loss, **opts)


class CsrConv1x1(nn.Module):
    """Inference of a bias-free 1x1 conv on [M, C, 1, 1] with its weight held as a CSR matrix."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        with warnings.catch_warnings():   # torch's notice that sparse CSR support is in beta, once per layer
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight = conv.weight.detach().flatten(1).to_sparse_csr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight @ x.flatten(1).t()).t()[..., None, None]


def prune_to(weight: torch.Tensor, level: float) -> torch.Tensor:
    """The soft threshold at the D that leaves ``level`` of ``weight`` exactly zero."""
    d = weight.abs().flatten().kthvalue(max(1, int(level * weight.numel()))).values
    return weight - weight.clamp(-d, d)


def layer_rows(device: torch.device, rows: int, rate: float, levels: list[float], repeats: int) -> str:
    torch.manual_seed(0)
    conv = nn.Conv2d(16384, 2048, 1, bias=False).to(device)
    spikes = (torch.rand(rows, 16384, 1, 1, device=device) < rate).float()
    out = ["| weights zero | dense ms | CSR ms | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for level in levels:
        with torch.no_grad():
            conv.weight.copy_(prune_to(conv.weight, level) if level else conv.weight)
            zero = (conv.weight == 0).float().mean().item()
            csr = CsrConv1x1(conv)
            fns = {"dense": lambda: conv(spikes), "csr": lambda: csr(spikes)}
            dense_ms, csr_ms = alternating_step_ms(fns, device, warmup=1, repeats=repeats).values()
            diff = (conv(spikes) - csr(spikes)).abs().max().item()
        out.append(f"| {100 * zero:.1f}% | {dense_ms:.2f} | {csr_ms:.2f} | {dense_ms / csr_ms:.2f}x | {diff:.1e} |")
    return "\n".join(out)


def model_rows(device: torch.device, batch: int, T: int, level: float, repeats: int) -> str:
    torch.manual_seed(0)
    model = timm.create_model("snn_cifar10", num_classes=10, T=T).to(device).eval()
    apply_stds(model, "stmod", 0.0)
    with torch.no_grad():   # each layer at its own D leaving `level` of it zero (a global D would empty fc1)
        for m in (m for m in model.modules() if parametrize.is_parametrized(m, "weight")):
            theta = m.parametrizations.weight.original
            m.parametrizations.weight[0].d.fill_(theta.abs().flatten().kthvalue(int(level * theta.numel())).values)
    total = sparsity(model)
    export(model)
    dense = copy.deepcopy(model)
    model.fc1, model.fc2 = CsrConv1x1(model.fc1), CsrConv1x1(model.fc2)
    x = torch.randn(batch, 3, 32, 32, device=device)
    with torch.no_grad():
        fns = {"dense": lambda: dense(x), "csr": lambda: model(x)}
        dense_ms, csr_ms = alternating_step_ms(fns, device, warmup=1, repeats=repeats).values()
        same = torch.allclose(dense(x), model(x))
    return (f"snn_cifar10 exported at {100 * total.total:.1f}% sparsity (fc1 {100 * total.layer('fc1'):.1f}%), "
            f"batch {batch}, T {T}: dense {dense_ms:.1f} ms, fc1/fc2 as CSR {csr_ms:.1f} ms -> "
            f"{dense_ms / csr_ms:.2f}x (same outputs: {same})")


def _sizes(text: str) -> list[tuple[int, int]]:
    """--inputs as (batch, side) pairs, or one error line."""
    try:
        sizes = [tuple(int(v) for v in size.split("x")) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise BionetsError(f"--inputs {text}: give BATCHxSIDE pairs of whole numbers >= 1, e.g. 4x64,8x112")
    return sizes


def _levels(text: str) -> list[float]:
    """--levels as sparsity fractions in [0, 1), or one error line."""
    try:
        levels = [float(v) for v in text.split(",")]
    except ValueError:
        levels = [-1.0]
    if not all(0 <= v < 1 for v in levels):
        raise BionetsError(f"--levels {text}: give sparsity fractions in [0, 1), e.g. 0,0.9,0.95")
    return levels


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--inputs", default="4x64,8x112", help="(a) SEW ResNet-18 inputs, BATCHxSIDE,...: the weights' "
                   "cost is fixed per step, the convs' grows with batch x T x pixels (ImageNet: 32 x 224 per GPU)")
    p.add_argument("--T", type=positive, default=4, help="(a) time steps")
    p.add_argument("--rows", type=positive, default=128, help="(b) rows of spikes: T x batch (8 x 16 in the recipe)")
    p.add_argument("--rate", type=float, default=0.1, help="(b) firing rate of the layer's input spikes")
    p.add_argument("--levels", default="0,0.9,0.95,0.98,0.99", help="(b) sparsity levels")
    p.add_argument("--model-batch", type=positive, default=16, help="(c) CIFAR SNN batch (T 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=positive, default=7)
    p.add_argument("--rounds", type=positive, default=2, help="(a) measure every case this many times, keep the fastest "
                   "(a shared CPU's noise hits cases unevenly)")
    p.add_argument("--no-isolate", action="store_true",
                   help="(a) measure every case in this process (default on CPU: one fresh process per case)")
    p.add_argument("--out", type=writable, help="also write the report to this Markdown file")
    args = p.parse_args(argv)
    device = parse_device(args.device, "--device")
    inputs, levels = _sizes(args.inputs), _levels(args.levels)         # (before (a): a typo failed after it)
    cuda = device.type == "cuda"
    opts = {"amp": "bf16" if cuda else "off", "channels_last": cuda, "warmup": args.warmup, "repeats": args.repeats}
    dev = str(device)
    isolate = not cuda and not args.no_isolate
    parts = [f"# STDS benchmark\n\ndevice: {device_name(device)}; amp {opts['amp']}; torch {torch.__version__}; "
             f"median of {args.repeats}; (a) best of {args.rounds} rounds, "
             f"{'one process per case' if isolate else 'one process'}\n"]
    for batch, img in inputs:
        rows = [run_case(isolate, best_of, args.rounds, fn, batch, img, args.T, dev, opts)
                for fn in (None, "stmod", "st", "identity")]
        ratio = rows[1].ratio(rows[0])
        parts.append(f"### (a) training step at batch {batch}, {img} x {img}, T {args.T}: "
                     f"STDS on every conv vs none\n\n"
                     f"{table(rows, rows[0])}\n\nstmod step ratio {ratio:.3f}x "
                     f"({verdict(ratio, 1.10)})\n")
    parts.append(f"### (b) the 16384 -> 2048 layer on {args.rows} rows of spikes (rate {args.rate}), dense vs CSR\n\n"
                 + layer_rows(device, args.rows, args.rate, levels, args.repeats) + "\n")
    parts.append("### (c) the exported CIFAR SNN, inference\n\n"
                 + model_rows(device, args.model_batch, 8, 0.95, max(3, args.repeats // 2)) + "\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    run_script(main)
