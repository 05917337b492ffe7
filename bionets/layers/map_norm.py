"""LayerNorm over the spatial map [H, W] of each channel, with a per-position affine (the norm in
front of a Dit-ResNet block's quadratic term), that keeps a channels_last map channels_last.

For every sample n and channel c, over the P = H*W positions p:

    y_p = (x_p - mean) / sqrt(var + eps) * w_p + b_p,    mean = sum_p x_p / P,    var = sum_p (x_p - mean)^2 / P

exactly :class:`torch.nn.LayerNorm` with ``normalized_shape = (H, W)`` (same parameters, same
state-dict keys). PyTorch's LayerNorm normalizes contiguous trailing dimensions: a channels_last
map is copied to NCHW for it, its output stays NCHW, and the quadratic term, which reads channels
last, copies it back; the backward copies twice more, and its input gradient arrives NCHW beside the
convolution's channels_last one. On the CPU, for float32 channels_last maps, this module computes
the norm in C++ on the map as it lies (``map_norm_cpu.cpp``, :mod:`bionets.layers.cpu_kernels`); every
other case (GPU, other dtypes or layouts, tracing, torch.compile, no compiler) is PyTorch's LayerNorm.
Under CPU autocast a bf16 or fp16 map is normalized in float32 and returned in float32, as CUDA's
autocast runs LayerNorm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bionets.errors import BionetsError, is_real, require_sizes
from bionets.layers import cpu_kernels
from bionets.layers.amp import autocast_casts, autocast_on
from bionets.layers.kernel_fallback import differentiable_backward, plain_call


class MapLayerNorm(nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` over ``map_size`` = (H, W) of an [N, C, H, W] map (module docstring)."""

    def __init__(self, map_size: tuple[int, int], eps: float = 1e-5):
        if not isinstance(map_size, (tuple, list)) or len(map_size) != 2:
            raise BionetsError(f"MapLayerNorm takes map_size=(height, width), got {map_size!r}")
        height, width = map_size
        require_sizes("MapLayerNorm", height=height, width=width)
        if not (is_real(eps) and math.isfinite(eps) and eps > 0):
            # (0 or less divides a constant map by 0: NaN everywhere, silently)
            raise BionetsError(f"MapLayerNorm eps must be a positive number (e.g. 1e-5), got {eps!r}")
        super().__init__([int(height), int(width)], eps=float(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[2:] != self.normalized_shape:
            raise BionetsError(f"MapLayerNorm{self.normalized_shape} takes [N, C, {', '.join(map(str, self.normalized_shape))}]"
                               f" maps, got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise BionetsError(f"MapLayerNorm takes floating-point input, got {x.dtype}: convert it (x.float())")
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and autocast_on(x):
            # under CPU autocast: in float32, out in float32, as CUDA autocast runs layer_norm (on
            # Dit-ResNet-20's bf16 step, 1.25x -> 1.18x its twin's: bf16 LayerNorm and its copies are slow)
            x = x.float()
        weight, bias = self.weight, self.bias
        if weight is not None and _casts_weights(x, weight.dtype):
            # weights in x's dtype, as the quadratic terms': PyTorch's LayerNorm refused a float64 map
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        if _takes(x, weight, bias) and (kernels := cpu_kernels.ops("map_norm_cpu")) is not None:
            return _MapNormCpu.apply(x, weight, bias, self.eps, kernels)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def _casts_weights(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` go to x's dtype: where they differ, but not where autocast casts
    both to float32 itself (it leaves float64 alone), nor where PyTorch's CPU LayerNorm takes a bf16
    or fp16 map with float32 weights as they are (more precise)."""
    if x.dtype == dtype or autocast_casts(x, dtype):
        return False
    return not (x.device.type == "cpu" and dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16))


def _takes(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether the C++ kernels compute this call: a float32 channels_last [N, C, H, W] map of the
    norm's (H, W) on the CPU (with C > 1: for one channel both layouts are the same and PyTorch's own
    is as fast), eager (not traced, compiled or under a torch.func transform). Any other map goes to
    PyTorch's LayerNorm."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] > 1
            and weight is not None and x.shape[2:] == weight.shape and bias is not None and weight.dtype == torch.float32
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            and not (plain_call() or torch.onnx.is_in_onnx_export()))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels_last [N, C, H, W] map as the [N, H*W, C] tensor its memory holds (a view)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n, h * w, c)


class _MapNormCpu(torch.autograd.Function):
    """The norm by the C++ kernels; saves x, the per-(n, c) mean and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels):
        n, c = x.shape[:2]
        y = torch.empty_like(x)                               # channels_last, like x
        mean, rstd = x.new_empty(n, c), x.new_empty(n, c)
        kernels.forward(_rows(x), weight.contiguous().view(-1), bias.contiguous().view(-1), eps, _rows(y), mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.kernels, ctx.eps = kernels, eps
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():                   # create_graph=True: a backward autograd can differentiate
            return (*differentiable_backward(lambda x, w, b: F.layer_norm(x, w.shape, w, b, ctx.eps), (x, weight, bias),
                                             ctx.needs_input_grad[:3], grad), None, None)
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x)
        dw, db = ctx.kernels.backward(_rows(grad), _rows(x), weight.contiguous().view(-1), mean, rstd, _rows(dx))
        return dx, dw.view(weight.shape), db.view(weight.shape), None, None
