"""RAA's fused CPU kernels (``raa_cpu.cpp``), built on this machine at first use.

Eager RAA in PyTorch ops makes 8-10 passes over the map per step and pays the autograd overhead of
as many ops; on 2 CPU cores ResNet-20's step with RAA took 1.34x GELU's (GELU form), 1.24x ReLU's
(ReLU form). These two kernels make one pass each way, vectorized with ATen's ``Vectorized`` and
threaded with ``at::parallel_for`` (the equations are in the source). torch's C++ extension builder
compiles them once per machine (about 10 s on 2 cores, cached under
``torch.utils.cpp_extension.get_default_build_root()``), for the vector instructions torch itself
dispatches to here (AVX512, AVX2 or none), so a cache shared between machines never hands one a
kernel it cannot run.

Where no C++ compiler works, RAA warns once and uses its PyTorch path (correct, slower). Set the
environment variable ``BIONETS_CPU_KERNELS=0`` to use the PyTorch path without trying.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("raa_cpu.cpp")

# torch's own capability names -> the flags and the define that select ATen's Vectorized for them
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}

_STATE: dict[str, object] = {}     # "ops": the loaded operators, or "failed": why they cannot be built


def enabled() -> bool:
    """False where ``BIONETS_CPU_KERNELS=0`` asks for the PyTorch path."""
    return os.environ.get("BIONETS_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def extension_name() -> tuple[str, list[str]]:
    """(the extension's name, its compiler flags): the name carries the capability and a hash of the
    source, so each build has its own cache directory."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, [])
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    return f"bionets_raa_cpu_{capability.lower()}_{digest}", flags


def build():
    """Compile and load the kernels (or load the cached build): ``torch.ops.bionets_raa_cpu``. A
    failure is raised as one RuntimeError line: the missing compiler, or the compiler's first error."""
    from torch.utils import cpp_extension
    name, flags = extension_name()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (install g++, or set CXX)")
    if shutil.which("ninja") is None:            # torch's builder runs ninja: the pip package's, where not on PATH
        try:
            from ninja import BIN_DIR
        except ImportError:
            BIN_DIR = ""
        if BIN_DIR:
            os.environ["PATH"] = BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    if not any(root.glob(f"{name}/{name}.so")) and not any(root.glob(f"*/{name}/{name}.so")):
        print("bionets: building RAA's CPU kernels (once per machine, ~10 s)", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as err:    # noqa: BLE001  (the builder raises RuntimeError with the whole log, or OSError)
        lines = str(err).splitlines() or [type(err).__name__]
        first_error = next((ln.strip() for ln in lines if "error" in ln.lower() and "[1/" not in ln), lines[0])
        raise RuntimeError(f"building {name} failed: {first_error[:300]}") from err
    return torch.ops.bionets_raa_cpu


def _quiet_import():
    """Import torch.utils.cpp_extension without its warning about a missing CUDA runtime (meant for
    CUDA extensions; these are CPU-only)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def ops():
    """``torch.ops.bionets_raa_cpu`` (``forward``, ``backward``), or None where they cannot be built
    here (after one warning naming why) or are switched off. Built at the first call only."""
    if "ops" not in _STATE and "failed" not in _STATE:
        if not enabled():
            _STATE["failed"] = "BIONETS_CPU_KERNELS=0"
        else:
            from bionets.layers.triton_kernels import run_or_warn
            _quiet_import()
            done, reason = run_or_warn(build, "RAA's CPU kernels cannot be built here",
                                       "RAA uses its PyTorch path instead (correct, slower); set "
                                       "BIONETS_CPU_KERNELS=0 to skip the attempt")
            _STATE["ops" if done is not None else "failed"] = done if done is not None else reason
    return _STATE.get("ops")


def takes(x: torch.Tensor, v: torch.Tensor | None, c: torch.Tensor, dim: int) -> bool:
    """Whether the kernels compute RAA for x here: float32 CPU tensors (v and c too), x a 4-D map
    with the features on dim 1 (NCHW or channels_last) or a contiguous tensor with them last."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or c.dtype != torch.float32 or not x.numel():
        return False
    if v is not None and v.dtype != torch.float32:
        return False
    if dim == 1:
        layout_ok = x.ndim == 4 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    else:
        layout_ok = x.is_contiguous()
    return layout_ok and ops() is not None
