"""Where the layers' own kernels (Triton on the GPU, C++ on the CPU) give way to their PyTorch
expressions: where the toolchain fails (one warning, then the PyTorch path on that device:
:func:`run_or_fall_back`, :func:`failed_on`), and where a second
derivative is asked for (:func:`differentiable_backward`), and inside torch.func transforms or
forward-mode AD (:func:`under_function_transform`)."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.autograd import forward_ad


def run_or_warn(fn: Callable[[], Any], failure: str, instead: str, stacklevel: int = 3) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, reason)`` where the kernels ``fn`` runs cannot be built or
    launched here (Triton compiles its kernels and a small C launcher at first use, torch's C++
    extension builder the CPU kernels: a compiler, driver or version problem), after one warning
    ``bionets: <failure> (<reason>); <instead>`` (``stacklevel``: the caller it names, as
    :func:`warnings.warn` counts). CUDA running out of memory is raised: the model's
    problem, not the toolchain's."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:    # noqa: BLE001  (anything Triton's toolchain may raise)
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        warnings.warn(f"bionets: {failure} ({reason}); {instead}", stacklevel=stacklevel)
        return None, reason


_FAILED: dict[tuple[str, str], str] = {}    # (kernels, device) -> why they could not run there


def failed_on(kernels: str, device: torch.device) -> bool:
    """Whether the layer's ``kernels`` (a name: 'raa', 'arr') failed on ``device`` earlier in this process."""
    return (kernels, str(device)) in _FAILED


def run_or_fall_back(kernels: str, device: torch.device, fn: Callable[[], Any], failure: str, instead: str) -> Any:
    """``fn()``, which runs ``kernels`` on ``device``; None where they fail (:func:`run_or_warn`), and
    from then on :func:`failed_on` is true there, so that the caller takes its PyTorch path without
    trying again."""
    done, reason = run_or_warn(fn, failure, instead)
    if reason is not None:
        _FAILED[(kernels, str(device))] = reason
    return done


def differentiable_backward(expression: Callable[..., torch.Tensor], inputs: tuple, needs: tuple[bool, ...],
                            grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``expression(*inputs)`` for the output gradient ``grad``, as tensors autograd
    can differentiate again: what a hand-written backward returns when it is called with
    ``create_graph=True`` (gradient penalties, MAML, Hessian-vector products). The layers' fused
    kernels compute first derivatives only; their second derivatives would silently be zero, so
    under ``create_graph`` a layer differentiates its plain PyTorch expression instead. ``needs``:
    which inputs want a gradient (``ctx.needs_input_grad``); the others get None."""
    wanted = [k for k, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    with torch.enable_grad():
        # each input through its own alias: partial derivatives, even where one input is computed
        # from another (RAA's shift from x), and still functions of the inputs for the next derivative
        inputs = tuple(t.view_as(t) if k in wanted else t for k, t in enumerate(inputs))
        out = expression(*inputs)
        found = torch.autograd.grad(out, [inputs[k] for k in wanted], grad, create_graph=True, allow_unused=True)
    grads: list[torch.Tensor | None] = [None] * len(inputs)
    for k, g in zip(wanted, found):
        grads[k] = g
    return tuple(grads)


def under_function_transform() -> bool:
    """Whether a torch.func transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``hessian``, ...:
    per-sample gradients, functional MAML) or forward-mode AD (``torch.autograd.forward_ad`` dual
    tensors) is running. The fused kernels' autograd functions cannot run there (the C++ and Triton
    kernels see one plain tensor, not a batch of them, and have no forward derivative), so the layers
    use their plain PyTorch expressions, which both handle. Two cheap checks (~0.1 us)."""
    if torch.compiler.is_compiling():      # Dynamo cannot trace the check (a graph break); no transform there
        return False
    return forward_ad._current_level >= 0 or under_torch_func()


_compiling, _tracing, _functorch_level = (torch.compiler.is_compiling, torch._C._is_tracing,
                                          torch._C._functorch.peek_interpreter_stack)


def plain_call() -> bool:
    """Whether a layer takes its plain PyTorch expression, not its own kernels: under torch.compile,
    ``torch.jit.trace``, a torch.func transform or forward-mode AD (:func:`under_function_transform`).
    One call of four cheap checks: every eager RAA call asks it (on a GPU the eager steps of small
    models wait on the host)."""
    return _compiling() or _tracing() or forward_ad._current_level >= 0 or _functorch_level() is not None


def overload_callable(overload):
    """The callable an operator overload (``torch.ops.lib.op.default``) runs, without the overload's
    Python ``__call__`` frame (~2 us a call less on a 2-core CPU; the layers' eager calls, where a
    GPU's eager step waits on the host); the overload itself where torch keeps no such callable."""
    return getattr(overload, "_op", overload)


def under_torch_func() -> bool:
    """Whether a torch.func transform runs (not forward-mode AD alone): its tensors are wrapped, and a
    buffer the transformed function does not own cannot be written from them."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
