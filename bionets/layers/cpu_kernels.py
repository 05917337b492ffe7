"""C++ kernels for the layers' CPU paths, built on this machine at first use.

Where a layer's CPU cost is passes over memory and per-op dispatch rather than arithmetic, PyTorch
ops cannot fuse it and its eager path stays slow; each ``<name>.cpp`` beside this module holds such
kernels, vectorized with ATen's ``Vectorized`` and threaded with ``at::parallel_for``, and registers
them as ``torch.ops.bionets_<name>``:

* ``raa_cpu``: RAA's vector and scalar variants, one pass each way, and the whole activation as
  one operator with its autograd in C++ (``raa_autograd.h``; :mod:`bionets.layers.raa`);
* ``arr_cpu``: ARR's class-mean scan and loss as one operator with its autograd in C++
  (``arr_autograd.h``; :mod:`bionets.layers.arr`);
* ``quadratic_cpu``: the quadratic layer's symmetric form, its products formed block by block beside
  PyTorch's matmuls (:mod:`bionets.layers.quadratic_sym`);
* ``map_norm_cpu``: LayerNorm over a channels_last map's [H, W] in place of the copies to NCHW and
  back (:mod:`bionets.layers.map_norm`).

torch's C++ extension builder (``torch.utils.cpp_extension``, with the ``ninja`` package) compiles a
source at its layer's first CPU call, once per machine: 15-35 s on 2 cores (RAA's and ARR's, with
torch's C++ autograd headers, the longest), with one line on stderr, cached under
``~/.cache/torch_extensions`` (or ``TORCH_EXTENSIONS_DIR``). Each build is named by the vector
instructions torch itself dispatches to here (AVX512, AVX2 or none) and a hash of the source, the
headers beside it (``cpu_vec.h``, ``raa_autograd.h``, ``arr_autograd.h``) and torch's version, so a
cache shared between machines or environments never hands one a kernel it cannot run. (The GPU's
own C++ kernels are built the same way: :mod:`bionets.layers.cuda_kernels`.)

Where no C++ compiler works, the layer warns once and keeps to its PyTorch path (correct, slower).
The environment variable ``BIONETS_CPU_KERNELS=0`` takes the PyTorch paths without trying.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from bionets.layers.kernel_fallback import run_or_warn
from bionets.toolchain import quiet_import

USERS = {"raa_cpu": "RAA", "arr_cpu": "ARR", "quadratic_cpu": "the quadratic layer",   # source -> whose
         "map_norm_cpu": "the map LayerNorm"}
BUILD_TIME = {"raa_cpu": "~35 s", "arr_cpu": "~35 s", "quadratic_cpu": "~20 s", "map_norm_cpu": "~20 s"}     # on 2 cores

# torch's own capability names -> the flags and the define that select ATen's Vectorized for them
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}

_STATE: dict[str, object] = {}     # name -> its loaded operators, or a string: why they cannot be built


def enabled() -> bool:
    """False where ``BIONETS_CPU_KERNELS=0`` asks for the PyTorch paths."""
    return os.environ.get("BIONETS_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def source(name: str) -> Path:
    return Path(__file__).with_name(f"{name}.cpp")


def extension_name(name: str) -> tuple[str, list[str]]:
    """(the build's name, its compiler flags): ``bionets_<name>_<capability>_<hash>``, the hash of the
    source, the headers beside it, the flags and the torch it is compiled against (:func:`torch_key`)."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, [])
    key = source(name).read_bytes() + header_bytes() + " ".join([*flags, torch_key()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:10]
    return f"bionets_{name}_{capability.lower()}_{digest}", flags


def torch_key() -> str:
    """torch's version and where it is installed: a build is bound to the torch it was compiled
    against, and two environments (venvs, conda envs) sharing torch's extension directory with one
    name per build rebuilt each other's (~80 s at every switch: torch's builder sees other include
    paths)."""
    return f"{torch.__version__} {Path(torch.__file__).resolve().parent}"


def header_bytes() -> bytes:
    """The headers beside the sources (``*.h``), in name order: part of every build's hash."""
    return b"".join(h.read_bytes() for h in sorted(Path(__file__).parent.glob("*.h")))


def build(name: str):
    """Compile and load ``<name>.cpp`` (or load the cached build): ``torch.ops.bionets_<name>``. A
    failure is raised as one RuntimeError line: the missing compiler, or the compiler's first error."""
    ext, flags = extension_name(name)
    compile_extension(ext, [source(name)], f"{USERS[name]}'s CPU kernels", BUILD_TIME[name],
                      extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])
    return getattr(torch.ops, f"bionets_{name}")


def cxx() -> str:
    """The C++ compiler torch's builder runs: $CXX, else c++."""
    return os.environ.get("CXX", "c++")


def compile_extension(ext: str, sources: list[Path], what: str, takes: str, **options) -> None:
    """Build ``sources`` as the extension ``ext`` with torch's builder and load it (its operators
    register themselves), or load the cached build; one line on stderr before a build (``what`` is
    being built, ``takes`` how long; from torchrun's first process on each machine only). Failures
    raise one RuntimeError line: the missing compiler, or the compiler's first error."""
    quiet_import()
    from torch.utils import cpp_extension
    compiler = cxx()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (install g++, or set CXX)")
    if shutil.which("ninja") is None:            # torch's builder runs ninja: the pip package's, where not on PATH
        try:
            from ninja import BIN_DIR
        except ImportError:
            BIN_DIR = ""
        if BIN_DIR:
            os.environ["PATH"] = BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    first_on_machine = os.environ.get("LOCAL_RANK", "0") == "0"     # torchrun's processes build it once, together
    if first_on_machine and not is_built(ext):
        # (through tqdm: the first training forward builds them, under the epoch's progress bar)
        tqdm.write(f"bionets: building {what} (once per machine, {takes})", file=sys.stderr)
    try:
        cpp_extension.load(name=ext, sources=[str(s) for s in sources], is_python_module=False, verbose=False, **options)
    except Exception as err:    # noqa: BLE001  (the builder raises RuntimeError with the whole log, or OSError)
        lines = str(err).splitlines() or [type(err).__name__]
        first_error = next((ln.strip() for ln in lines if "error" in ln.lower() and "[1/" not in ln), lines[0])
        raise RuntimeError(f"building {ext} failed: {first_error[:300]}") from err


def is_built(ext: str) -> bool:
    """Whether torch's extension cache holds the build ``ext`` (in the cache's root where
    TORCH_EXTENSIONS_DIR names it, else in the default root's folder for this Python and CUDA)."""
    quiet_import()
    from torch.utils import cpp_extension
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return any(root.glob(f"{ext}/{ext}.so")) or any(root.glob(f"*/{ext}/{ext}.so"))


def ops(name: str):
    """``torch.ops.bionets_<name>``, or None where the kernels cannot be built here (after one warning
    naming why) or are switched off. Built at the first call only."""
    return built_once(_STATE, name, lambda: None if enabled() else "BIONETS_CPU_KERNELS=0", lambda: build(name),
                      f"{USERS[name]}'s CPU kernels cannot be built here",
                      f"{USERS[name]} uses its PyTorch path instead (correct, slower); set BIONETS_CPU_KERNELS=0 "
                      "to skip the attempt")


def built_once(state: dict[str, object], name: str, skip: Callable[[], str | None], build_it: Callable[[], Any],
               failure: str, instead: str):
    """``state[name]``: the operators ``build_it()`` returns, built at the first call only; None where
    ``skip()`` names a reason not to try, or where the build fails (one warning: ``failure``,
    ``instead``). ``state`` keeps the operators or the reason."""
    if name not in state:
        reason = skip()
        if reason is None:
            done, reason = run_or_warn(build_it, failure, instead, stacklevel=4)     # names the layer that asked
        state[name] = done if reason is None else reason
    found = state[name]
    return None if isinstance(found, str) else found
