"""Where RAA's extra step time goes: its operator, or its parameters' bookkeeping.

    python benchmarks/raa_param_cost.py [--device cuda] [--batch 128] [--steps 120] [--rounds 2]

ResNet-20 (GELU and ReLU), stepped in turn with RAA in four ways: the plain activation; RAA; RAA
with its parameter vc = [v | c] frozen (no gradient accumulated, no optimizer entry: the operator's
cost alone); RAA with vc trained but left out of the optimizer (its gradient accumulated, added in
place every step since no zero_grad clears it, no update). Each layer's parameter is one tensor
more for autograd's AccumulateGrad, the optimizer's per-parameter Python and zero_grad; on a GPU
whose eager step waits on the host, that bookkeeping is part of issue 3's ratio (RAA <= 1.15x the
plain activation's step), which this splits. (On an H200, with v and c still two tensors a layer:
RAA 1.14-1.19x, frozen 1.09-1.12x.) Each way's step peak memory follows its timings.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

from bionets.bench import device_name, run_script, split_arguments, train_step, ways_report
from bionets.conversion import convert
from bionets.engine.distributed import parse_device
from bionets.layers.raa import RAA


def steps_for(act: str, x: torch.Tensor, y: torch.Tensor, amp: str) -> dict:
    """Step functions of the four ways (see the module's docstring) for ResNet-20 with ``act``."""
    torch.manual_seed(0)
    plain = timm.create_model("resnet20_cifar", num_classes=10, **({"act_layer": "gelu"} if act == "gelu" else {}))
    plain = plain.to(x.device)
    steps = {act: train_step(plain, x, y, amp=amp, channels_last=True)[0]}
    for way in ("RAA", "RAA, vc frozen", "RAA, vc not in the optimizer"):
        model = convert(copy.deepcopy(plain), activation="raa")[0].to(x.device)
        own = [p for name, p in model.named_parameters() if name.rpartition(".")[2] == "vc"]
        if len(own) != sum(isinstance(m, RAA) for m in model.modules()):
            raise SystemExit("raa_param_cost: not every RAA layer has its parameter vc (the vector variant's), "
                             "which this script measures")
        if "frozen" in way:
            for p in own:
                p.requires_grad_(False)
        taken = {id(p) for p in own} if "optimizer" in way else set()
        opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in taken], lr=1e-3, momentum=0.9)
        steps[f"{act} {way}"] = train_step(model, x, y, amp=amp, channels_last=True, optimizer=opt)[0]
    return steps


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    split_arguments(p)
    args = p.parse_args(argv)
    dev = parse_device(args.device, "--device")
    amp = "bf16" if dev.type == "cuda" else "off"
    out = [f"device: {device_name(dev)}; batch {args.batch}; amp {amp}; channels_last; ResNet-20, SGD with momentum"]
    print(out[0], flush=True)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    for act in ("gelu", "relu"):
        out += ways_report(steps_for(act, x, y, amp), act, dev, args.rounds, args.steps)
    return "\n".join(out)


if __name__ == "__main__":
    run_script(main)
