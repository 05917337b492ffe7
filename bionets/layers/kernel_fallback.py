"""The one way every layer tries its own kernels (Triton on the GPU, C++ on the CPU): run, and where
the toolchain fails, warn once and let the layer fall back to its PyTorch path."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch


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
