"""Where the layers find their Triton kernels: Triton is optional (it comes with torch's Linux CUDA
wheels), so the kernel modules are imported on first use."""
from __future__ import annotations

import functools
import importlib
import types


@functools.cache
def triton_kernels(module: str) -> types.ModuleType | None:
    """``bionets.layers.<module>`` (a module of Triton kernels), or None where Triton is not installed."""
    try:
        return importlib.import_module(f"bionets.layers.{module}")
    except ImportError:
        return None
