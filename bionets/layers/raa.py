"""Response-Adaptive Activation (RAA) of DNRT (Qiu et al., ICLR 2024).

A biological neuron's firing threshold moves with its input. RAA gives GELU an input-dependent
threshold computed from the whole feature vector x of one token (or one pixel of a CNN)::

    shift = v . x + c                 (v: a learned vector, c: a learned scalar; both start at 0)
    RAA(x) = x * Phi(x + shift)       (Phi: standard normal CDF; element-wise, one shift per vector)

so RAA starts as exact GELU (``x * Phi(x)``). v and c are one parameter, ``vc = [v | c]`` (C + 1
entries, the spec's count): one tensor a layer for autograd and the optimizer to keep. Variants of
the reference code:
``scalar`` (shift = c), ``matrix`` (an element-wise shift ``W x + c`` with a full matrix W), and the
ReLU form ``max(0, x + shift)`` (the output itself shifted) for networks built on ReLU.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bionets.errors import BionetsError, require_sizes
from bionets.layers import cpu_kernels, cuda_kernels
from bionets.layers.amp import autocast_on
from bionets.layers.kernel_fallback import (differentiable_backward, failed_on, overload_callable, plain_call,
                                            run_or_fall_back)
from bionets.layers.scratch import scratch_like
from bionets.layers.triton_kernels import triton_kernels
from bionets.toolchain import require_cpu_compiler

Variant = Literal["vector", "scalar", "matrix"]
Base = Literal["gelu", "relu"]


SQRT1_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


class _ShiftedGelu(torch.autograd.Function):
    """``x * Phi(x + s)`` with a hand-written backward that keeps only x and s (s broadcasts): the
    matrix variant's activation.

    d/dx = Phi(z) + x phi(z), d/ds = x phi(z) (summed over s's broadcast axes), z = x + s.
    """

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return _gelu_of_shifted(x, s)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        if torch.is_grad_enabled():                   # create_graph=True: a backward autograd can differentiate
            return differentiable_backward(lambda x, s: x * torch.special.ndtr(x + s), (x, s), ctx.needs_input_grad, grad)
        gx, gxphi = _shifted_gelu_grads(x, s, grad)
        return gx, _sum_to(gxphi, s.shape).mul_(INV_SQRT_2PI)


def shifted_gelu(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x * Phi(x + s)`` (eager, hand-written backward)."""
    return _ShiftedGelu.apply(x, s)


# The eager CPU kernels behind these choices (2 cores, a [32, 16, 32, 32] map, float32, into existing
# buffers): torch.erf 0.40 ms, torch.exp 0.22, torch.exp2 0.09, GELU's forward 0.21 and backward
# 0.31, a multiply 0.04 (GELU's kernels are vectorized, the standalone erf and exp much less); a
# pass into a fresh activation-sized tensor costs ~0.35 ms more (page faults). So: Phi(z) from GELU's
# forward as gelu(z) / z, phi(z) through exp2, GELU's backward kernel in the backward, z in a scratch
# buffer on the CPU, everything else in place.

_ZERO = torch.zeros(())


def _shifted(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """z = x + s: in a scratch buffer with x's layout on the CPU when s is a broadcast shift (z then
    never leaves the caller), else a fresh tensor."""
    if x.device.type == "cpu" and s.numel() < x.numel() and torch.result_type(x, s) == x.dtype:
        return torch.add(x, s, out=scratch_like("raa_shifted", x))
    return torch.add(x, s)


def _gelu_of_shifted(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x * Phi(x + s)``, with ``Phi(z) = gelu(z) / z`` (GELU's vectorized kernel: torch.erf is half
    as fast on the CPU, torch's ndtr several times slower). z is clamped to [-40, 40] first, where Phi
    is already 0 or 1 in float64, so that an infinite z gives Phi's limit, not inf / inf; at z = 0
    the quotient 0/0 is replaced by Phi(0) = 1/2; a NaN z stays NaN."""
    z = _shifted(x, s).clamp_(-40.0, 40.0)
    return F.gelu(z).div_(z).masked_fill_(z == 0, 0.5).mul_(x)


def _shifted_gelu_grads(x: torch.Tensor, s: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx through the activation, ``grad x exp(-z^2 / 2)``) for ``x * Phi(z)``, z = x + s; the
    second times ``INV_SQRT_2PI`` is ``grad x phi(z)`` (callers scale it after their reduction).

    GELU's backward gives ``grad (Phi(z) + z phi(z))``; subtracting ``grad s phi(z)`` leaves
    ``grad (Phi(z) + x phi(z))``, without an erf."""
    z = _shifted(x, s)
    grad = grad.to(z.dtype)
    gx = torch.ops.aten.gelu_backward(grad, z)
    # grad exp(-z^2 / 2) = grad 2^(-z^2 / (2 ln 2)), in z's buffer
    gphi = torch.addcmul(_ZERO, z, z, value=-0.5 / math.log(2), out=z).exp2_().mul_(grad)
    gx.addcmul_(gphi, s, value=-INV_SQRT_2PI)
    return gx, gphi.mul_(x)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed over the axes along which a tensor of ``shape`` was broadcast to it."""
    if t.shape == shape:
        return t
    lead = t.ndim - len(shape)
    dims = [d for d in range(t.ndim) if d < lead or shape[d - lead] == 1]
    return t.sum(dims, keepdim=True).reshape(shape)


def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with its feature axis last (a view; contiguous for channels_last maps and for tokens)."""
    return x.permute(0, 2, 3, 1) if dim == 1 else x


def _feature_dot(x: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v . x`` over the feature axis, kept as a size-1 axis: a batched matrix-vector product over
    the layout x has (an einsum here took 0.6 ms on a [32, 16, 32, 32] map, this 0.05)."""
    if dim == 1 and x.is_contiguous():
        n, c = x.shape[:2]
        return torch.matmul(v.view(1, 1, c), x.view(n, c, x.shape[2:].numel())).view(n, 1, *x.shape[2:])
    return (_rows(x, dim) @ v).unsqueeze(dim)


def _feature_weighted_sum(x: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum over every vector of x: w * x`` [C], w holding one weight per vector (size-1 feature axis)."""
    if dim == 1 and x.is_contiguous():
        n, c = x.shape[:2]
        positions = x.shape[2:].numel()        # not -1: an empty batch leaves it undetermined
        return torch.linalg.vecdot(x.view(n, c, positions), w.reshape(n, 1, positions)).sum(0)
    rows = _rows(x, dim)
    return w.reshape(-1) @ rows.reshape(-1, rows.shape[-1])


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_DTYPES = (torch.float32, torch.bfloat16)


def raa_triton() -> types.ModuleType | None:
    """:mod:`bionets.layers.raa_triton`, or None where Triton is not installed."""
    return triton_kernels("raa_triton")


def _triton_layout(x: torch.Tensor, dim: int):
    """x's [N, C, P] layout when the Triton kernels take it (CUDA, a float dtype they compute in
    float32), else None. (Inside a compiled model RAA never gets here: see :meth:`RAA.forward`.)"""
    if not x.is_cuda or x.dtype not in _TRITON_DTYPES or not x.numel() or failed_on("raa", x.device) \
            or raa_triton() is None:
        return None
    return raa_triton().ncp_layout(x, dim)


def _triton_forward(x: torch.Tensor, v, c, layout, relu: bool):
    """The Triton forward, or None if Triton cannot build or launch its kernels on x's device: then
    one warning, and the PyTorch path there from then on."""
    return run_or_fall_back("raa", x.device, lambda: raa_triton().forward(x, v, c, layout, relu=relu),
                            "RAA's Triton kernels cannot run here",
                            "RAA uses its PyTorch path instead (correct, slower on a GPU)")


def _cpu_kernels(x: torch.Tensor, w: torch.Tensor, dim: int):
    """RAA's C++ kernels (``raa_cpu.cpp``, :mod:`bionets.layers.cpu_kernels`) where they compute RAA
    for x, else None: a CPU tensor x, float32 with w = [v | c] or [c], as a 4-D map with the features on dim 1
    (NCHW or channels_last) or a contiguous tensor with them last; bf16 x with the features
    contiguous in memory (channels_last maps, tokens)."""
    if not x.is_cpu or x.dtype not in _CPU_DTYPES or not x.numel() or w.dtype != torch.float32:
        return None
    if dim != 1:
        layout_ok = x.is_contiguous()
    elif x.ndim != 4:
        layout_ok = False
    elif x.is_contiguous():             # the kernels read it as NCHW: features contiguous only with 1 pixel
        layout_ok = x.dtype == torch.float32 or x.shape[2] * x.shape[3] == 1
    else:
        layout_ok = x.is_contiguous(memory_format=torch.channels_last)
    return cpu_kernels.ops("raa_cpu") if layout_ok else None


def _cuda_kernels(x: torch.Tensor, w: torch.Tensor, dim: int):
    """RAA's CUDA C++ kernels (``raa_cuda.cu``, :mod:`bionets.layers.cuda_kernels`) where they compute
    RAA for x, else None: a CUDA tensor x in float32, bf16 or fp16 read as [N, C, P] without a copy
    (channels_last maps, contiguous tokens, NCHW maps of at most 64 channels), w float32, at
    most 8191 features; where nvcc is installed (otherwise the Triton kernels serve)."""
    if not x.is_cuda or x.dtype not in _TRITON_DTYPES or not x.numel() or x.shape[dim] > 8191 \
            or w.dtype != torch.float32:
        return None
    if dim == 1 and x.ndim == 4 and x.is_contiguous() and x.shape[2] * x.shape[3] > 1:
        # NCHW: one thread a vector, each with C + 1 partial sums in the backward's 32 KB of shared
        # memory, so wider maps would run few threads a block: those take the Triton kernels
        layout_ok = x.shape[1] <= 64
    elif dim == 1:
        layout_ok = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
    else:
        layout_ok = x.is_contiguous()
    return cuda_kernels.ops("raa_cuda") if layout_ok else None


def _own_kernels(x: torch.Tensor, w: torch.Tensor, dim: int):
    """RAA's own operators for x (C++ on the CPU, CUDA C++ on the GPU; each one call forward and
    backward, autograd in C++), or None: then :class:`_RaaVector` (Triton kernels or PyTorch ops)."""
    return _cuda_kernels(x, w, dim) if x.is_cuda else _cpu_kernels(x, w, dim)


def in_own_dtype(x: torch.Tensor):
    """A context that computes in x's dtype: autocast off where it is on. RAA's sums run in x's dtype
    on every path, as its kernels compute them (autocast ran the PyTorch path's shift v . x, a matmul,
    in bf16 for a float32 x: 1e-2 off, and dL/dc up to 13% with 200 features)."""
    return torch.autocast(x.device.type, enabled=False) if autocast_on(x) else contextlib.nullcontext()


def matrix_shift(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, dim: int) -> torch.Tensor:
    """The matrix variant's ``W x + c`` per vector (a 1x1 convolution on maps), W x in x's dtype
    (W cast as the vector variant's v; autocast off, as everywhere in RAA), c as it is."""
    with in_own_dtype(x):
        w = w.to(x.dtype)
        wx = torch.einsum("oc,nc...->no...", w, x) if dim == 1 else x @ w.T
    return wx + (c.view(-1, 1, 1) if dim == 1 else c)


class _RaaVector(torch.autograd.Function):
    """RAA's vector and scalar variants, both forms, shift included, in one autograd function.

    With shift = v . x + c (vector) or c (scalar) and z = x + shift, per element:
    gelu form ``y = x Phi(z)``: ``dy/dx|_shift = Phi(z) + x phi(z)``, ``dy/dshift = x phi(z)``;
    relu form ``y = max(0, z)``: both are ``1[z > 0]``.
    With ``gs`` = grad * dy/dshift summed over each vector's features: dL/dx gains ``v gs``,
    dL/dv = sum over vectors of ``gs x``, dL/dc = sum of ``gs``.
    Each direction is one fused Triton kernel on CUDA (:mod:`bionets.layers.raa_triton`), saving x and
    the shift; elsewhere PyTorch ops, saving x and the shift (gelu) or x and y (relu; y is kept alive
    by the next layer anyway). (Where RAA's own C++ or CUDA kernels run, :meth:`RAA._eager` calls
    their operator instead, whose autograd is C++ too: ``raa_autograd.h``.)
    """

    @staticmethod
    def forward(ctx, x, w, dim, base):
        ctx.dim, ctx.base, ctx.layout, ctx.kernel = dim, base, None, "torch"
        v, c = split_shift(w)
        layout = _triton_layout(x, dim)
        done = _triton_forward(x, v, c, layout, base == "relu") if layout is not None else None
        if done is not None:                           # CUDA: one fused kernel each way
            ctx.kernel, ctx.layout = "triton", layout
            y, s = done
            ctx.save_for_backward(x, w, s)
            return y
        with in_own_dtype(x):
            s = c if v is None else _feature_dot(x, v.to(x.dtype), dim) + c
        if base == "relu":
            y = torch.add(x, s).relu_().to(x.dtype)
            ctx.save_for_backward(x, w, y)
        else:
            y = _gelu_of_shifted(x, s).to(x.dtype)
            ctx.save_for_backward(x, w, s)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, saved = ctx.saved_tensors
        dim = ctx.dim
        v, c = split_shift(w)
        if torch.is_grad_enabled():                   # create_graph=True: a backward autograd can differentiate
            variant = "scalar" if v is None else "vector"
            return (*differentiable_backward(lambda x, w: raa_expression(x, w, variant, ctx.base, dim), (x, w),
                                             ctx.needs_input_grad[:2], grad), None, None)
        if ctx.kernel == "triton":
            gx, gv, gc = raa_triton().backward(x, grad, saved, v, ctx.layout, relu=ctx.base == "relu")
        else:
            gx, gv, gc = _torch_backward(x, v, saved, grad, dim, ctx.base)
        gc = gc.reshape(1)
        return gx, (gc if v is None else torch.cat([gv.reshape(-1), gc])).to(w.dtype), None, None


def _torch_backward(x, v, saved, grad, dim: int, base: str):
    """(dL/dx, dL/dv or None, dL/dc) by PyTorch operators; ``saved`` the shift (gelu) or y (relu)."""
    if base == "relu":
        gx = torch.ops.aten.threshold_backward(grad, saved, 0)
        gs, scale = gx, 1.0
    else:
        gx, gs = _shifted_gelu_grads(x, saved, grad)
        scale = INV_SQRT_2PI
    gv = None
    if v is not None:
        gs = gs.sum(dim, keepdim=True).mul_(scale)
        gx = gx.addcmul_(v.to(gx.dtype).view(-1, 1, 1) if dim == 1 else v.to(gx.dtype), gs)
        gv = _feature_weighted_sum(x, gs.to(x.dtype), dim)
        gc = gs.sum()
    else:
        gc = gs.sum() * scale
    return gx.to(x.dtype), gv, gc


def split_shift(w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(v, c) of a vector or scalar RAA's parameter w = [v | c] or [c]: views (v None for [c])."""
    return (w[:-1] if w.numel() > 1 else None), w[-1:]


def raa_expression(x: torch.Tensor, w: torch.Tensor, variant: str, base: str, dim: int,
                   matrix: torch.Tensor | None = None) -> torch.Tensor:
    """The whole RAA (shift and activation) as plain tensor expressions, for ``torch.compile`` to
    fuse: the shift's reduction over the features and the activation in one kernel per pass. The
    output has x's dtype (under autocast the float32 parameters would otherwise promote it).
    ``w`` is [v | c] (vector), [c] (scalar) or c (matrix, whose W is ``matrix``); ``dim`` the
    feature axis (1 or -1)."""
    if variant == "matrix":
        s = matrix_shift(x, matrix, w, dim)
    else:
        v, c = split_shift(w)
        s = c if v is None else (x * (v.view(-1, 1, 1) if dim == 1 else v)).sum(dim, keepdim=True) + c   # fusable
    z = x + s
    if base == "relu":     # torch.relu here compiles to a CPU kernel ~9x slower (torch 2.14)
        return torch.clamp_min(z, 0).to(x.dtype)
    return (x * (0.5 + 0.5 * torch.erf(z * SQRT1_2))).to(x.dtype)   # x's dtype: float32 parameters promote


_COMPILED: dict[int, object] = {}


def compiled_raa(width: int):
    """:func:`raa_expression` compiled for tensors of ``width`` features, with static shapes (a kernel
    per shape; measured ~10% faster per step than dynamic ones on the CPU). Each width gets its own
    copy of the function's code, so that torch's limit of 8 compiled versions per function applies
    to one width's shapes (train and last batch, train and eval), not to all the network's layers."""
    if width not in _COMPILED:
        code = raa_expression.__code__.replace(co_name=f"raa_expression_{width}")
        fn = types.FunctionType(code, raa_expression.__globals__, code.co_name, raa_expression.__defaults__)
        _COMPILED[width] = torch.compile(fn, dynamic=False)
    return _COMPILED[width]


class RAA(nn.Module):
    """RAA over ``num_features``. The feature axis: ``dim=1`` (the channels of an NCHW map, or of a
    Conv1d's [N, C, L] or a Conv3d's [N, C, D, H, W] output, which are computed as 4-D maps), ``-1``
    (the last dim: tokens, MLP inputs, NHWC maps) or None (found per call: dim 1 of a 4-D or 5-D map
    whose dim 1 has ``num_features`` entries, the last dim of a 3-D tensor where it has them (tokens),
    else dim 1 where it has them, else the last dim; :func:`~bionets.layers.raa_swap.swap_activations`
    sets it from the layer before the activation where that layer decides it, so that an NHWC map
    whose height happens to equal the width is not read as NCHW).

    Parameters: ``vc`` = [v | c], ``num_features + 1`` (vector); ``c``, 1 (scalar); ``W`` and ``c``,
    ``num_features^2 + num_features`` (matrix). A state dict with the vector variant's former
    separate ``v`` and ``c`` loads into ``vc``.
    """

    # the last eager call's (shape, strides, dtypes, device type, dim), its feature axis, its operator (or None)
    # and its shift's parameter name
    _route = None

    def __init__(self, num_features: int, variant: Variant = "vector", base: Base = "gelu", compiled: bool = False,
                 dim: int | None = None):
        super().__init__()
        if variant not in ("vector", "scalar", "matrix") or base not in ("gelu", "relu"):
            raise BionetsError(f"RAA variant must be vector|scalar|matrix and base gelu|relu, got {variant!r}, {base!r}")
        require_sizes("RAA", num_features=num_features)
        if dim not in (None, 1, -1):
            raise BionetsError(f"RAA's feature axis dim must be 1 (the channels of an [N, C, ...] map), -1 (last) or "
                               f"None (per call), got {dim!r}")
        self.num_features, self.variant, self.base, self.compiled, self.dim = num_features, variant, base, compiled, dim
        if variant == "vector":
            self.vc = nn.Parameter(torch.zeros(num_features + 1))
        else:
            self.c = nn.Parameter(torch.zeros(num_features if variant == "matrix" else 1))
        if variant == "matrix":
            self.W = nn.Parameter(torch.zeros(num_features, num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, variant={self.variant}, base={self.base}" + ("" if self.dim is None else f", dim={self.dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self._route
        if route is not None and isinstance(x, torch.Tensor) and not (self.compiled or plain_call()):
            key, dim, op, name = route
            w = self._parameters[name]
            if key == (x.shape, x.stride(), x.dtype, x.is_cuda, x.is_cpu, w.dtype, self.dim):
                # a call like the last eager one (every training step's): checked, its operator chosen
                return op(x, w, dim, self.base == "relu") if op is not None else self._eager(op, x, dim, w)
        return self._checked_call(x)

    def _checked_call(self, x: torch.Tensor) -> torch.Tensor:
        """RAA of x after every check, its kernels chosen for x; remembers the choice in ``_route``
        for the calls like this one (an eager call, else RAA's plain expression)."""
        if not isinstance(x, torch.Tensor):
            raise BionetsError(f"RAA takes a torch.Tensor, got {type(x).__name__}: convert it (torch.as_tensor(x))")
        if x.ndim in (3, 5) and self.dim != -1 and self._channels_first(x):     # (tokens, dim -1: one test)
            # a Conv1d's or Conv3d's map: each position's features on dim 1, as in an [N, C, H, W] map
            return self.forward(x.unsqueeze(-1) if x.ndim == 3 else x.flatten(3)).reshape(x.shape)
        plain = plain_call()
        if self.compiled or plain:
            # inside a compiled model (train.compile) the plain expression, which Inductor fuses and
            # differentiates itself: ResNet-20's compiled step 12-14% faster on the CPU than tracing
            # the hand-written autograd function below; the same under torch.func transforms
            dim = self._checked_dim(x)
            if not plain and x.device.type == "cpu":
                require_cpu_compiler("RAA(compiled=True)", "set compiled=False (mechanisms.raa.compiled=false)")
            fn = raa_expression if plain else compiled_raa(self.num_features)
            return fn(x, self.shift_params, self.variant, self.base, dim, getattr(self, "W", None))
        w = self.shift_params
        dim = self._checked_dim(x)
        if (x.is_cpu and x.dtype in (torch.bfloat16, torch.float16)
                and (self.variant == "matrix" or _cpu_kernels(x, w, dim) is None)):
            # the CPU's element-wise kernels are fast in float32 and slow on mixed dtypes (a bf16
            # map times a float32 one took 1.1 ms against 0.03): compute in float32, round once
            # (the C++ kernels, where they take the map, read and write bf16 themselves)
            with torch.autocast("cpu", enabled=False):
                x32 = x.float()
                return self._eager(self._op_for(x32, dim, w), x32, dim, w).to(x.dtype)
        op = self._op_for(x, dim, w)
        self._route = ((x.shape, x.stride(), x.dtype, x.is_cuda, x.is_cpu, w.dtype, self.dim), dim, op,
                       "vc" if self.variant == "vector" else "c")
        return self._eager(op, x, dim, w)

    @property
    def v(self) -> torch.Tensor:
        """The vector variant's v: ``vc[:-1]``, a view (to read, or to set under ``torch.no_grad()``;
        the gradient is vc's)."""
        if "vc" not in self._parameters:
            raise AttributeError(f"RAA's {self.variant} variant has no v")
        return self._parameters["vc"][:-1]

    @property
    def c(self) -> torch.Tensor:
        """c: the vector variant's ``vc[-1:]`` (a view, as :attr:`v`), else the parameter c."""
        params = self._parameters
        if "c" in params:
            return params["c"]
        if "vc" in params:
            return params["vc"][-1:]
        raise AttributeError("c")                   # (during __init__, before c is registered)

    @property
    def shift_params(self) -> torch.Tensor:
        """``vc`` (vector variant) or ``c``: the parameter the kernels take as w."""
        return self._parameters["vc" if self.variant == "vector" else "c"]

    @staticmethod
    def _former_vc(state: dict, prefix: str, variant: str) -> torch.Tensor | None:
        """[v | c] (detached) from ``state`` where it holds a vector RAA's former separate ``v`` and
        ``c`` under ``prefix`` (and no ``vc``), else None."""
        v, c = prefix + "v", prefix + "c"
        if variant != "vector" or prefix + "vc" in state or v not in state or c not in state:
            return None
        return torch.cat([state[v].detach().reshape(-1), state[c].detach().reshape(-1)])

    def upgrade_state_dict(self, state: dict, prefix: str = "") -> dict:
        """``state`` with a vector RAA's former ``v`` and ``c`` under ``prefix`` as ``vc`` (a new
        dict), or ``state`` itself. (bionets' engine asks every module that has this method before it
        compares a checkpoint's keys with the model's.)"""
        if (vc := self._former_vc(state, prefix, self.variant)) is None:
            return state
        return {**{k: t for k, t in state.items() if k not in (prefix + "v", prefix + "c")}, prefix + "vc": vc}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A vector RAA's state from before v and c were one parameter: ``v`` and ``c`` as ``vc``."""
        if (vc := self._former_vc(state_dict, prefix, self.variant)) is not None:
            del state_dict[prefix + "v"], state_dict[prefix + "c"]
            state_dict[prefix + "vc"] = vc
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _channels_first(self, x: torch.Tensor) -> bool:
        """Whether a 3-D or 5-D x has its features on dim 1 (see the class's ``dim``)."""
        if self.dim is not None:
            return self.dim == 1
        n = self.num_features
        return x.shape[1] == n and (x.ndim == 5 or x.shape[-1] != n)

    def _checked_dim(self, x: torch.Tensor) -> int:
        """The feature axis of x (see the class's ``dim``); an error line for a tensor RAA cannot take."""
        dim = self.dim if self.dim is not None else 1 if x.ndim == 4 and x.shape[1] == self.num_features else -1
        if dim == 1 and x.ndim == 2:             # [N, C]: the features are the last dim
            dim = -1
        if x.ndim == 0 or dim == 1 and x.ndim != 4 or x.shape[dim] != self.num_features:
            raise BionetsError(f"RAA built for {self.num_features} features got a tensor of shape {tuple(x.shape)} (it "
                               "takes them on dim 1 of an [N, C, ...] map or on the last dim); where a swap built it, "
                               "the width read from the layers registered before the activation it replaced does not "
                               "match this call (layers registered out of call order, or one module called at several "
                               "widths): swap with an example input (swap_activations(..., example_input=x), or the raa "
                               "option input_size: [C, H, W]) so that every call's width is seen, or exclude it by "
                               "pattern")
        if not x.is_floating_point():            # (integers were rounded silently; nn.GELU refuses them)
            raise BionetsError(f"RAA takes floating-point input, got {x.dtype}: convert it (x.float())")
        return dim

    def _op_for(self, x: torch.Tensor, dim: int, w: torch.Tensor):
        """RAA's own operator's overload for x (one call forward and backward, autograd in C++), or None."""
        if self.variant == "matrix":
            return None
        kernels = _own_kernels(x, w, dim)
        return None if kernels is None else overload_callable(kernels.raa.default)     # (the packet: ~4 us more)

    def __setstate__(self, state):
        """A whole RAA module pickled before v and c were one parameter: its v and c as vc."""
        params = state.get("_parameters", {})
        if (vc := self._former_vc(params, "", state.get("variant"))) is not None:
            params["vc"] = nn.Parameter(vc, requires_grad=params.pop("v").requires_grad)
            del params["c"]
        super().__setstate__(state)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_route", None)                     # (the operator it names does not pickle)
        return state

    def _eager(self, op, x: torch.Tensor, dim: int, w: torch.Tensor) -> torch.Tensor:
        """RAA through ``op`` (its own operator's overload) or, where None, its autograd function or
        (matrix variant) PyTorch ops; w is [v | c] (vector), [c] (scalar) or c (matrix)."""
        if self.variant != "matrix":
            if op is not None:
                return op(x, w, dim, self.base == "relu")
            return _RaaVector.apply(x, w, dim, self.base)
        s = matrix_shift(x, self.W, w, dim)
        if self.base == "relu":
            return torch.add(x, s).relu_().to(x.dtype)           # max(0, x + shift), in x's dtype
        return shifted_gelu(x, s).to(x.dtype)                 # x * Phi(x + shift), in x's dtype
