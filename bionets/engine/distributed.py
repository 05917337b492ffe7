"""Process-group set-up for ``torchrun``: the same entry point runs alone or as one of N ranks.

nanoGPT's convention: a run is distributed when ``RANK`` and ``WORLD_SIZE`` are set (torchrun sets
them). CUDA runs use NCCL with one GPU per local rank; CPU runs use gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bionets.errors import BionetsError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created: bool = False       # this process group was set up here (not by the caller)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def parse_device(name: str, option: str, local_rank: int = 0) -> torch.device:
    """``name`` as a torch device, or one error line naming ``option`` as the user spells it.

    ``option`` is ``train.device``, an experiment's ``device`` or ``--device``. ``auto`` is the CUDA
    device of this local rank when there is one, else the CPU; a bare ``cuda`` is this rank's GPU.
    """
    said = f"{option} {name}" if option.startswith("--") else f"{option}={name}"
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BionetsError(f"{said} is not a device bionets runs on: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BionetsError(f"{said}, but this machine has no CUDA device: use cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=parse_device(device_name, "train.device"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(device_name, "train.device", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device, created)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, say) on every rank."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            sent = buffer.contiguous()
            sent = sent.view(torch.uint8) if sent.dtype == torch.bool else sent     # (gloo has no bool)
            dist.broadcast(sent, 0)
            if sent.data_ptr() != buffer.data_ptr():
                buffer.copy_(sent.view(buffer.dtype) if buffer.dtype == torch.bool else sent)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
