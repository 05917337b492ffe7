"""CUDA C++ kernels for the layers' GPU paths, built on this machine at first use where CUDA's
compiler is installed.

On a GPU, the eager training steps of CIFAR-sized models wait on the host, and a layer's Python (an
autograd function, a Triton launch) costs more host time than its kernels take on the GPU. Where a
layer has its own CUDA kernels, it calls one operator per call whose autograd is C++ as well:

* ``raa_cuda``: RAA's vector and scalar variants (``raa_cuda.cu``: the kernels; ``raa_cuda.cpp``:
  the operators, with the autograd of ``raa_autograd.h``; :mod:`bionets.layers.raa`);
* ``arr_cuda``: ARR's class-mean scan and loss (``arr_cuda.cu``, ``arr_cuda.cpp``, with the
  autograd of ``arr_autograd.h``; :mod:`bionets.layers.arr`).

torch's C++ extension builder compiles them with ``nvcc`` at the layer's first CUDA call, once per
machine (about a minute, with one line on stderr; cached under ``~/.cache/torch_extensions`` or
``TORCH_EXTENSIONS_DIR``), for the compute capability of each visible GPU. The build's name hashes
the sources, the headers beside them, those capabilities, torch's and CUDA's versions and the
toolkit's place.

torch's wheels do not bring ``nvcc``: where torch's builder finds no CUDA toolkit (nvcc and CUDA's
headers under ``CUDA_HOME``, or found from nvcc on PATH) the layers use their Triton kernels,
without a warning; where the build fails, one warning and the same. ``BIONETS_CUDA_KERNELS=0`` skips them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

import torch

from bionets.layers import cpu_kernels
from bionets.toolchain import quiet_import

USERS = {"raa_cuda": "RAA", "arr_cuda": "ARR"}     # sources -> whose
OPERATOR = {"raa_cuda": "raa", "arr_cuda": "arr_loss"}     # sources -> an operator they register

_STATE: dict[str, object] = {}     # name -> its loaded operators, or a string: why they cannot be built


def enabled() -> bool:
    """False where ``BIONETS_CUDA_KERNELS=0`` asks to skip them."""
    return os.environ.get("BIONETS_CUDA_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def sources(name: str) -> list[Path]:
    here = Path(__file__).parent
    return [here / f"{name}.cpp", here / f"{name}.cu"]


def arch_flags(capabilities: list[tuple[int, int]]) -> list[str]:
    """nvcc's flags for machine code of each compute capability, and PTX of the newest (which the
    driver can compile for a newer GPU)."""
    caps = sorted(set(capabilities))
    flags = [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]
    a, b = caps[-1]
    return flags + [f"-gencode=arch=compute_{a}{b},code=compute_{a}{b}"]


def extension_name(name: str, capabilities: list[tuple[int, int]]) -> str:
    """``bionets_<name>_sm<capabilities>_<hash>``, the hash of the sources, the headers beside them,
    the capabilities, torch (its version and place: :func:`cpu_kernels.torch_key`), CUDA's version,
    the toolkit's place (``CUDA_HOME``) and its nvcc's version."""
    key = b"".join(p.read_bytes() for p in sources(name)) + cpu_kernels.header_bytes()
    quiet_import()
    from torch.utils import cpp_extension
    key += f"{sorted(set(capabilities))} {cpu_kernels.torch_key()} {torch.version.cuda} {cpp_extension.CUDA_HOME}".encode()
    key += nvcc_version(cpp_extension.CUDA_HOME).encode()
    sms = "_".join(f"{a}{b}" for a, b in sorted(set(capabilities)))
    return f"bionets_{name}_sm{sms}_{hashlib.sha256(key).hexdigest()[:10]}"


@functools.lru_cache(maxsize=None)
def nvcc_version(home: str | None) -> str:
    """The last line of ``nvcc --version`` under ``home`` (its release and build), or '' where it
    does not answer."""
    if home is None:
        return ""
    try:
        done = subprocess.run([str(Path(home, "bin", "nvcc")), "--version"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout.strip().splitlines() or [""])[-1]


def build(name: str, capabilities: list[tuple[int, int]] | None = None):
    """Compile and load ``<name>.cpp`` and ``<name>.cu`` (or load the cached build) for the visible
    GPUs (or ``capabilities``): ``torch.ops.bionets_<name>``. A failure raises one RuntimeError line,
    as does a second build in one process (:func:`ops` builds once)."""
    loaded = getattr(torch.ops, f"bionets_{name}")
    if hasattr(loaded, OPERATOR[name]):
        # one build a process: a second library registering the same operators aborts the process
        raise RuntimeError(f"another build of bionets_{name} is loaded in this process already; build it for other "
                           "compute capabilities in a new process")
    if capabilities is None:
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    cpu_kernels.compile_extension(extension_name(name, capabilities), sources(name), f"{USERS[name]}'s CUDA kernels",
                                  "about a minute", extra_cflags=["-O3"],
                                  extra_cuda_cflags=["-O3", *arch_flags(capabilities)])
    return getattr(torch.ops, f"bionets_{name}")


def ops(name: str):
    """``torch.ops.bionets_<name>``, or None where the kernels cannot be built here (where nvcc is
    missing, silently: the layers' Triton kernels serve; else after one warning naming why) or are
    switched off. Built at the first call only."""
    return cpu_kernels.built_once(_STATE, name, _reason_to_skip, lambda: build(name),
                                  f"{USERS[name]}'s CUDA kernels cannot be built here",
                                  f"{USERS[name]} uses its Triton kernels instead; set BIONETS_CUDA_KERNELS=0 to skip "
                                  "the attempt")


def _reason_to_skip() -> str | None:
    if not enabled():
        return "BIONETS_CUDA_KERNELS=0"
    return None if has_cuda_toolkit() else "no CUDA toolkit"


def has_cuda_toolkit() -> bool:
    """Whether torch's builder finds a CUDA toolkit: nvcc and CUDA's runtime headers under its
    ``CUDA_HOME`` (found from the ``CUDA_HOME`` variable, else from nvcc on PATH)."""
    quiet_import()
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    return home is not None and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists()
