"""DNRT's cost: RAA against GELU (ViT-Tiny) and ReLU (CIFAR ResNet-18), ARR's added step time.

    python benchmarks/bench_dnrt.py [--batch 32] [--device cpu] [--compiled]

Targets (issue 3): RAA training step <= 1.15x the plain activation's; ARR adds <= 3%.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
from torch import nn

import bionets  # noqa: F401
from bionets.bench import device_name, measure, table
from bionets.conversion import convert


def arr_loss_fn(model, hooks):
    def loss(logits, targets):
        out = nn.functional.cross_entropy(logits, targets)
        for h in hooks:
            out = out + h.aux_loss(model, None, logits, targets)
        return out
    return loss


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="also time RAA with its torch.compile path")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    amp, cl = ("bf16", True) if dev.type == "cuda" else ("off", False)
    out = [f"device: {device_name(dev)}; batch {args.batch}; amp {amp}"]
    cases = [("vit_tiny (img 32, patch 4)", "vit_tiny_patch16_224", dict(img_size=32, patch_size=4), "GELU"),
             ("resnet18_cifar", "resnet18_cifar", {}, "ReLU")]
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    for label, name, kwargs, act in cases:
        torch.manual_seed(0)
        plain = timm.create_model(name, num_classes=10, **kwargs).to(dev)
        rows = [measure(f"{label} {act}", plain, x, y, amp=amp, channels_last=cl, repeats=args.repeats)]
        variants = [("RAA", {"activation": "raa"})]
        if args.compiled:
            variants.append(("RAA compiled", {"activation": {"compiled": True}}))
        for tag, kw in variants:
            model, _ = convert(copy.deepcopy(plain), **kw)
            rows.append(measure(f"{label} {tag}", model.to(dev), x, y, amp=amp, channels_last=cl, repeats=args.repeats))
        model, report = convert(copy.deepcopy(plain), regularization={"weight": 10.0})
        model.to(dev)
        for h in report.hooks:
            h.attach(model)
        rows.append(measure(f"{label} {act} + ARR", model, x, y, amp=amp, channels_last=cl, repeats=args.repeats,
                            loss_fn=arr_loss_fn(model, report.hooks)))
        out += ["", table(rows, rows[0])]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
