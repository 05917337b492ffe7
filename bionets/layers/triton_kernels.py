"""Where the layers find their Triton kernels: Triton is optional (it comes with torch's Linux CUDA
wheels), so the kernel modules are imported on first use, and a machine where Triton cannot build
them gets one warning and the layer's PyTorch path (:func:`bionets.layers.kernel_fallback.run_or_warn`)."""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

_MODULES: dict[str, types.ModuleType | None] = {}


def triton_kernels(module: str) -> types.ModuleType | None:
    """``bionets.layers.<module>`` (a module of Triton kernels), or None where Triton is not installed.
    (A plain dict, not ``functools.cache``: torch.compile traces through this and warns on caches.)"""
    if module not in _MODULES:
        try:
            _MODULES[module] = importlib.import_module(f"bionets.layers.{module}")
        except ImportError:
            _MODULES[module] = None
    return _MODULES[module]


def launch_device(t: torch.Tensor):
    """A context under which Triton launches its kernels on ``t``'s CUDA device. Triton launches on
    the current device, which a model on cuda:1 in a process whose current device is cuda:0 (one
    process, ``train.device=cuda:1``) does not set; entered only where the two differ (switching
    devices costs host time on every call)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
