"""Shared pieces of the tests of models under torch.compile and of bionets' C++ kernels: the same
outputs and gradients as eager, the skip where the CPU has no C++ compiler, and the kernels
themselves, which must build wherever one works."""
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from bionets.toolchain import cpu_compiler_problem

needs_cpu_compiler = pytest.mark.skipif(cpu_compiler_problem() is not None,
                                        reason="torch.compile on the CPU needs a C++ compiler")


@functools.cache
def openmp_problem() -> str | None:
    """Why the compiler bionets' kernels build with (cpu_kernels.cxx()) cannot build an OpenMP
    program here (Apple's clang without libomp, say), or None."""
    from bionets.layers.cpu_kernels import cxx
    compiler = cxx()
    if shutil.which(compiler) is None:
        return f"{compiler} is not on PATH"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "omp.cpp"
        source.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        built = subprocess.run([compiler, "-fopenmp", str(source), "-o", str(Path(tmp) / "omp")],
                               capture_output=True, text=True)
    return None if built.returncode == 0 else f"{compiler} -fopenmp fails ({(built.stderr.strip() or '?').splitlines()[-1]})"


def own_cpu_kernels(name: str):
    """``torch.ops.bionets_<name>``, bionets' C++ kernels; a skip only where they are not meant to be
    built (no C++ compiler with OpenMP, or BIONETS_CPU_KERNELS=0). Where one works, a failed build
    fails the test: a compile error in the kernels' own source used to skip their float64 and
    gradient tests with nothing but a warning."""
    from bionets.layers import cpu_kernels
    if (problem := cpu_compiler_problem() or openmp_problem()) is not None:
        pytest.skip(f"no C++ compiler with OpenMP here: {problem}")
    if not cpu_kernels.enabled():
        pytest.skip("BIONETS_CPU_KERNELS=0")
    ops = cpu_kernels.ops(name)
    assert ops is not None, (f"{name}'s C++ kernels did not build although a C++ compiler works (the warning "
                             "above says why); set BIONETS_CPU_KERNELS=0 to test the PyTorch paths only")
    return ops


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, *, mode: str | None = None,
                                  backend="inductor", calls: int = 1, rtol: float = 1e-4, atol: float = 1e-5,
                                  grad_tol: float = 1e-4) -> None:
    """``torch.compile(model, mode=mode, backend=backend)`` called ``calls`` times (CUDA graphs record
    on a later call than the first) gives the eager outputs and parameter gradients (loss: sum of
    squares). A counting backend (torch._dynamo.testing) lets the caller inspect the graphs."""
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, mode=mode, backend=backend)
    for _ in range(calls):
        got = compiled(x)
        got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol)


def output_dtype_under_bf16_autocast(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype of ``module``'s output when the compiled ``model`` runs under bf16 autocast."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        torch.compile(model)(x).float().sum().backward()
    handle.remove()
    return seen[0]
