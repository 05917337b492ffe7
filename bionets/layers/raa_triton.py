"""RAA's vector and scalar variants as two Triton kernels, for CUDA tensors.

On a GPU, a ResNet-20 or ViT-Tiny step at CIFAR sizes is bound by the host's kernel launches, not by
the GPU: eager RAA in PyTorch ops launched about 25 kernels per call against GELU's 2, and its step
took 2.3-2.5x GELU's on an H200. These kernels do the whole activation in one pass each way::

    forward, per feature vector x (one token, or one pixel of a map):
        s = v . x + c                       (scalar variant: s = c)
        y = x Phi(x + s)                    (gelu form)     y = max(0, x + s)    (relu form)
    backward, with z = x + s and g = dL/dy:
        gs    = sum_features g dy/ds        (x phi(z), or 1[z > 0])
        dL/dx = g dy/dx|_s + v gs           (Phi(z) + x phi(z), or 1[z > 0])
        dL/dv = sum_vectors gs x,  dL/dc = sum_vectors gs     (per-program partial sums, then one torch sum)

Each program takes ``BLOCK_M`` vectors whole (the features padded to a power of two). A tensor is
read as [N, C, P] with one stride each (NCHW maps, channels_last maps, token tensors), so neither
layout is copied. Math is in float32 whatever the input's dtype; s is saved in float32.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors (the tests
do this in a subprocess).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bionets.layers.triton_kernels import launch_device

SQRT1_2 = tl.constexpr(0.7071067811865476)        # kernels may read globals only as constexpr
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _offsets(pid, M, C, P, sn, sc, sp, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)
    offs = ((rows64 // P) * sn + (rows64 % P) * sp)[:, None] + cols[None, :].to(tl.int64) * sc
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return rows, cols, offs, mask


@triton.jit
def _raa_forward_kernel(x_ptr, v_ptr, c_ptr, y_ptr, s_ptr, M, C, P, sn, sc, sp,
                        HAS_V: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, offs, mask = _offsets(tl.program_id(0), M, C, P, sn, sc, sp, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(c_ptr).to(tl.float32)
    if HAS_V:
        v = tl.load(v_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        s += tl.sum(x * v[None, :], axis=1)                                   # s = v . x + c
    z = x + s[:, None]
    if RELU:
        y = tl.maximum(z, 0.0)                                                # max(0, x + s)
    else:
        y = x * (0.5 + 0.5 * tl.erf(z * SQRT1_2))                             # x Phi(x + s)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, s, mask=rows < M)


@triton.jit
def _raa_backward_kernel(x_ptr, g_ptr, s_ptr, v_ptr, gx_ptr, part_ptr, M, C, P, sn, sc, sp, PART_W,
                         HAS_V: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows, cols, offs, mask = _offsets(pid, M, C, P, sn, sc, sp, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=rows < M, other=0.0)
    z = x + s[:, None]
    if RELU:
        dy_dx = tl.where(z > 0, 1.0, 0.0)
        dy_ds = dy_dx
    else:
        phi = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        dy_ds = x * phi                                                       # x phi(z)
        dy_dx = 0.5 + 0.5 * tl.erf(z * SQRT1_2) + dy_ds                       # Phi(z) + x phi(z)
    gs = tl.sum(g * dy_ds, axis=1)                                            # dL/ds per vector
    gx = g * dy_dx
    if HAS_V:
        v = tl.load(v_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        gx += v[None, :] * gs[:, None]                                        # through s = v . x + c
        tl.store(part_ptr + pid * PART_W + cols, tl.sum(x * gs[:, None], axis=0), mask=cols < C)
    tl.store(part_ptr + pid * PART_W + PART_W - 1, tl.sum(gs, axis=0))
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def ncp_layout(x: torch.Tensor, dim: int) -> tuple[int, int, int, int, int, int] | None:
    """(N, C, P, stride_n, stride_c, stride_p) reading x as [N, C, P] without a copy, or None.

    dim 1 of a 4-D map: P = H W, for NCHW and channels_last maps; dim -1: contiguous tensors. Only
    dense layouts qualify: the outputs are made with ``empty_like``, which keeps a dense tensor's
    strides (a channel slice of a larger map, say, would get other strides than x)."""
    if dim == 1 and x.ndim == 4:
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return None
        n, c, h, w = x.shape
        sn, sc, sh, sw = x.stride()
        if h == 1 or sh == w * sw:
            return n, c, h * w, sn, sc, sw
        return None
    if x.is_contiguous():
        c = x.shape[-1]
        return x.numel() // max(c, 1), c, 1, c, 1, 0
    return None


def _blocks(c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    return max(1, min(128, 4096 // block_c)), block_c


def forward(x: torch.Tensor, v: torch.Tensor | None, c: torch.Tensor, layout, relu: bool):
    """(y with x's dtype and strides, s float32 [N P]) for x read as ``layout`` (see :func:`ncp_layout`)."""
    n, ch, p, sn, sc, sp = layout
    m = n * p
    block_m, block_c = _blocks(ch)
    y = torch.empty_like(x)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    with launch_device(x):
        _raa_forward_kernel[(triton.cdiv(m, block_m),)](x, v if v is not None else c, c, y, s, m, ch, p, sn, sc, sp,
                                                       HAS_V=v is not None, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    return y, s


def backward(x: torch.Tensor, grad: torch.Tensor, s: torch.Tensor, v: torch.Tensor | None, layout, relu: bool):
    """(dL/dx, dL/dv or None, dL/dc as a 1-element float32 tensor)."""
    n, ch, p, sn, sc, sp = layout
    m = n * p
    if grad.stride() != x.stride():
        grad = torch.empty_like(x).copy_(grad)
    block_m, block_c = _blocks(ch)
    grid = triton.cdiv(m, block_m)
    width = ch + 1 if v is not None else 1
    part = torch.empty(grid, width, dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x)
    with launch_device(x):
        _raa_backward_kernel[(grid,)](x, grad, s, v if v is not None else s, gx, part, m, ch, p, sn, sc, sp, width,
                                      HAS_V=v is not None, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    sums = part.sum(0)
    return gx, (sums[:ch] if v is not None else None), sums[-1:]
