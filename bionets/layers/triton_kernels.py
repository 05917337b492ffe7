"""Where the layers find their Triton kernels: Triton is optional (it comes with torch's Linux CUDA
wheels), so the kernel modules are imported on first use, and a machine where Triton cannot build
them gets one warning and the layer's PyTorch path."""
from __future__ import annotations

import importlib
import types
import warnings
from typing import Any, Callable

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


def run_or_warn(fn: Callable[[], Any], failure: str, instead: str) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, reason)`` where the kernels ``fn`` runs cannot be built or
    launched here (Triton compiles its kernels and a small C launcher at first use, torch's C++
    extension builder the CPU kernels: a compiler, driver or version problem), after one warning
    ``bionets: <failure> (<reason>); <instead>``. CUDA running out of memory is raised: the model's
    problem, not the toolchain's."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:    # noqa: BLE001  (anything Triton's toolchain may raise)
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        warnings.warn(f"bionets: {failure} ({reason}); {instead}", stacklevel=3)
        return None, reason
