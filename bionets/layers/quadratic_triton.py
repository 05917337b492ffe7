"""The symmetric channel-wise quadratic term as Triton matmuls whose left operand is formed on the fly.

Every pass of :class:`~bionets.layers.quadratic.QuadraticChannel`'s 'sym' form is a matmul over
products of two row vectors, so one kernel pattern serves all three (rows m, M = N H W)::

    forward   q[m, o]    = sum_k  x[m, i_k] x[m, j_k] S[k, o]             k over the C(C+1)/2 pairs i <= j
    dL/dx     dx[m, c]   = sum_oj g[m, o] x[m, j] T[(o, j), c]             T_o = Q_o + Q_o^T
    dL/dS     dS[k, o]   = sum_m  x[m, i_k] x[m, j_k] g[m, o]

The products never exist in memory: each program loads the two factors of a BLOCK_K-wide slice of
products for its BLOCK_M rows (from L1/L2: a row has only C values), multiplies them in registers and
feeds ``tl.dot``. The eager 'blocks' strategy writes and reads every product through GPU memory; this
one reads x once per output tile. float32 inputs use full-precision dots (``input_precision='ieee'``),
bf16/fp16 the tensor cores, accumulating in float32.

Experimental: correct (tested on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``, against
the float64 formula), its speed not yet measured on a GPU. Chosen with
``bionets.layers.quadratic.set_cuda_strategy('fused')``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pair_products_matmul_kernel(u_ptr, w_ptr, a_ptr, b_ptr, rhs_ptr, out_ptr, M, K: tl.constexpr, N,
                                 stride_u, stride_w, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k u[m, a_k] w[m, b_k] rhs[k, n]. K (the pair count, fixed per layer) is a
    compile-time constant: Triton 3.6's interpreter cannot run a loop bounded by a runtime argument."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + ks, mask=ks < K, other=0)
        b = tl.load(b_ptr + ks, mask=ks < K, other=0)
        mk = (rows < M)[:, None] & (ks < K)[None, :]
        left = tl.load(u_ptr + rows64[:, None] * stride_u + a[None, :], mask=mk, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + rows64[:, None] * stride_w + b[None, :], mask=mk, other=0.0).to(tl.float32)
        right = tl.load(rhs_ptr + ks[:, None].to(tl.int64) * N + cols[None, :],
                        mask=(ks < K)[:, None] & (cols < N)[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(left, right.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(left.to(right.dtype), right)
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _pair_products_t_matmul_kernel(x_ptr, i_ptr, j_ptr, g_ptr, part_ptr, M, K, N, stride_x,
                                   STEPS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    """part[split, k, n] = sum over this split's rows m of x[m, i_k] x[m, j_k] g[m, n]; a split is
    STEPS row blocks (a compile-time count, as K is above)."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    i = tl.load(i_ptr + ks, mask=ks < K, other=0)
    j = tl.load(j_ptr + ks, mask=ks < K, other=0)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for step in range(STEPS):
        rows = (split * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        mk = (ks < K)[:, None] & (rows < M)[None, :]
        left = tl.load(x_ptr + rows64[None, :] * stride_x + i[:, None], mask=mk, other=0.0).to(tl.float32) \
            * tl.load(x_ptr + rows64[None, :] * stride_x + j[:, None], mask=mk, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows64[:, None] * N + cols[None, :], mask=(rows < M)[:, None] & (cols < N)[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(left, g.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(left.to(g.dtype), g)
    tl.store(part_ptr + (split.to(tl.int64) * K + ks[:, None]) * N + cols[None, :], acc,
             mask=(ks < K)[:, None] & (cols < N)[None, :])


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def pair_products_matmul(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         rhs: torch.Tensor) -> torch.Tensor:
    """``out[m, n] = sum_k u[m, a_k] w[m, b_k] rhs[k, n]`` for row-major u [M, *], w [M, *], rhs [K, N];
    out has rhs's dtype."""
    u, w, rhs = u.contiguous(), w.contiguous(), rhs.contiguous()
    m, (k, n) = u.shape[0], rhs.shape
    out = torch.empty(m, n, dtype=rhs.dtype, device=u.device)
    if not m:
        return out
    block_m, block_n, block_k = 64, _block(n, 128), _block(k, 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _pair_products_matmul_kernel[grid](u, w, a, b, rhs, out, m, k, n, u.stride(0), w.stride(0),
                                       IEEE=rhs.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                                       BLOCK_K=block_k)
    return out


def pair_products_t_matmul(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[k, n] = sum_m x[m, i_k] x[m, j_k] g[m, n]`` in float32, the rows split over enough
    programs to fill the GPU (per-split partial sums, then one torch sum)."""
    x, g = x.contiguous(), g.contiguous()
    m, k, n = x.shape[0], i.numel(), g.shape[1]
    if not m:
        return torch.zeros(k, n, dtype=torch.float32, device=x.device)
    block_m, block_n, block_k = 64, _block(n, 64), 64
    tiles = triton.cdiv(k, block_k) * triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(m, block_m), 512 // tiles))
    steps = triton.next_power_of_2(triton.cdiv(triton.cdiv(m, splits), block_m))   # few distinct compiles
    splits = triton.cdiv(m, steps * block_m)
    part = torch.empty(splits, k, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n), splits)
    _pair_products_t_matmul_kernel[grid](x, i, j, g, part, m, k, n, x.stride(0), STEPS=steps,
                                         IEEE=g.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                                         BLOCK_K=block_k)
    return part.sum(0)
