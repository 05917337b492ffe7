"""Shared pieces of the tests of models under torch.compile: the same outputs and gradients as eager,
and the skip where the CPU has no C++ compiler for Inductor."""
import pytest
import torch

from bionets.toolchain import cpu_compiler_problem

needs_cpu_compiler = pytest.mark.skipif(cpu_compiler_problem() is not None,
                                        reason="torch.compile on the CPU needs a C++ compiler")


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
