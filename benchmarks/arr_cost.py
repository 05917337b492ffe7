"""Where ARR's added step time goes: its hook, its loss's forward, its backward, its Python checks.

    python benchmarks/arr_cost.py [--device cuda] [--batch 128] [--steps 120] [--rounds 2] [--cases resnet-relu,vit]

Each model (ResNet-20 with ReLU: ARR on the classifier's input; ViT-Tiny, patch 4 on 32x32: ARR on
the class token after every block) is stepped in turn in five ways, one step of each per round:

- the plain model;
- ``hook``: ARR's hook attached, its responses captured and dropped (no loss);
- ``loss, no backward``: ARR's loss computed (the class memory updated) and added detached, so
  the backward does not pass through it;
- ``ARR``: the loss as training adds it (bionets' engine, ``bench_dnrt.py``);
- ``ARR, operator called directly``: the same loss from ARR's own operator, without ``arr_loss``'s
  Python checks (where the operator is built: CPU C++, CUDA C++).

On a GPU whose eager step waits on the host, issue 3's target (ARR adds <= 3%) is missed by
+4-7% (H200, 2026-11-29); the differences between consecutive ways split that cost. Each way's
step peak memory follows its timings.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
from torch import nn

from bionets.bench import device_name, run_script, split_arguments, train_step, ways_report
from bionets.conversion import convert
from bionets.engine.distributed import parse_device
from bionets.errors import BionetsError
from bionets.engine.model import use_channels_last
from bionets.layers import arr as arr_module

CASES = {"resnet-relu": ("resnet20_cifar", {}), "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4))}


def loss_for(model: nn.Module, hook, way: str):
    """The loss function of one way (see the module's docstring) for ``model`` with ARR's ``hook``."""
    def loss(logits, targets):
        ce = nn.functional.cross_entropy(logits, targets)
        if way == "hook":
            hook.responses, hook.blocks = [], []
            return ce
        if way == "ARR, operator called directly":
            responses = hook.responses if hook.blocks[0] is None else arr_module.class_tokens(hook.blocks)
            hook.responses, hook.blocks = [], []
            memory = hook.memory
            own = arr_module._own_operator(memory, responses, targets)
            r = arr_module._stacked(responses)
            return ce + own.arr_loss.default(r, targets, memory.mean, memory.seen, hook.cfg.momentum, hook.cfg.weight,
                                             hook.cfg.form == "code", True)
        extra = hook.aux_loss(model, None, logits, targets)
        return ce + (extra.detach() if way == "loss, no backward" else extra)
    return loss


def steps_for(case: str, x: torch.Tensor, y: torch.Tensor, amp: str) -> dict:
    """Step functions of every way for one model."""
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=10, **kwargs).to(x.device)
    cl = use_channels_last("auto", plain, x.device)
    steps = {case: train_step(plain, x, y, amp=amp, channels_last=cl)[0]}
    ways = ["hook", "loss, no backward", "ARR"]
    if arr_module._own_operator(arr_module.ArrMemory(1, 10, 8).to(x.device), [x[:2, :8, 0, 0]], y[:2]) is not None:
        ways.append("ARR, operator called directly")
    for way in ways:
        model, report = convert(copy.deepcopy(plain), regularization={"weight": 10.0})
        model.to(x.device)
        hook = report.hooks[0]
        hook.attach(model)
        steps[f"{case} {way}"] = train_step(model, x, y, amp=amp, channels_last=cl,
                                            loss_fn=loss_for(model, hook, way))[0]
    return steps


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    split_arguments(p)
    p.add_argument("--cases", default="resnet-relu,vit", help=f"comma-separated subset of: {', '.join(CASES)}")
    args = p.parse_args(argv)
    chosen = args.cases.split(",")
    if set(chosen) - set(CASES):
        raise BionetsError(f"--cases {args.cases}: the cases are {', '.join(CASES)}")
    dev = parse_device(args.device, "--device")
    amp = "bf16" if dev.type == "cuda" else "off"
    out = [f"device: {device_name(dev)}; batch {args.batch}; amp {amp}; channels_last for ResNet-20; SGD with "
           "momentum; ARR weight 10, 10 classes"]
    print(out[0], flush=True)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    for case in chosen:
        out += ways_report(steps_for(case, x, y, amp), case, dev, args.rounds, args.steps)
    return "\n".join(out)


if __name__ == "__main__":
    run_script(main)
