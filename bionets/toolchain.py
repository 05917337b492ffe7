"""What torch.compile needs on this machine, checked before a run depends on it: on the CPU,
Inductor builds C++ kernels and fails deep inside the first compiled call when no compiler works."""
from __future__ import annotations

import functools
import logging

from bionets.errors import BionetsError, one_line


@functools.cache
def cpu_compiler_problem() -> str | None:
    """Why Inductor has no working C++ compiler here (one line), or None (checked once: ~70 ms)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:                 # another torch layout: let torch.compile report it itself
        return None
    try:
        get_cpp_compiler()
    except Exception as err:    # noqa: BLE001  (whatever Inductor's compiler probe raises)
        return one_line(err, 1000)
    return None


def require_cpu_compiler(what: str, instead: str) -> None:
    """One BionetsError naming ``what`` and the way out ``instead`` where no C++ compiler works."""
    quiet_import()
    problem = cpu_compiler_problem()
    if problem:
        raise BionetsError(f"{what} on the CPU needs a C++ compiler for torch.compile, and none works here "
                           f"({problem}): install one (g++ or clang++) or {instead}")


def quiet_import() -> None:
    """Import torch.utils.cpp_extension without its warning about a missing CUDA runtime (meant for
    CUDA extensions, which a machine without CUDA does not build: bionets' CUDA kernels are built only
    where nvcc and a GPU are), and Inductor imports it when it compiles for the CPU (the warning showed
    under --quiet)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)
