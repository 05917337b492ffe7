"""The symmetric channel-wise quadratic term as Triton matmuls over block outer products formed on the fly.

The channels are cut into blocks of W (zero-padded to a multiple of W). A product list is a list of
block pairs (A_p, B_p); pair p contributes the W x W products ``u[m, A_p W + s] w[m, B_p W + t]``,
row-major in (s, t). Every pass of :class:`~bionets.layers.quadratic.QuadraticChannel`'s 'sym' form
is a matmul whose left operand is such a list (rows m, M = N H W)::

    forward   q[m, o]  = sum_(p,s,t) x[m, I_p W+s] x[m, J_p W+t] S[(p,s,t), o]     pairs I <= J
    dL/dS     dS[(p,s,t), o] = sum_m x[m, I_p W+s] x[m, J_p W+t] g[m, o]
    dL/dx     dx[m, c] = sum_(p,s,t) g[m, O_p W+s] x[m, J_p W+t] T[(p,s,t), c]     all pairs (O, J)

with T_o = Q_o + Q_o^T. A program loads the two W-wide column blocks of its BLOCK_M rows (contiguous
reads), forms their outer product in registers, reshapes it to [BLOCK_M, W*W] and feeds ``tl.dot``:
the products never exist in GPU memory. Over the pairs I <= J the forward forms
``NB(NB+1)/2 W^2`` products per row, NB = ceil(C / W): 4,992 for C = 96 at W = 8, against 4,656
distinct pairs and 9,216 for all products. float32 inputs use full-precision dots
(``input_precision='ieee'``), bf16/fp16 the tensor cores, accumulating in float32.

The block pairs are enumerated in the kernels (I <= J row-major for the forward and dL/dS, all
(O, J) for dL/dx), not read from index tables: a table cached on the GPU and first made inside a
CUDA-graph warm-up would stay in the graph's memory pool, which torch.compile's CUDA graphs refuse.
Loop bounds are compile-time constants or loop variables (the block counts; the row blocks per
program of dL/dS): Triton 3.6's interpreter cannot run a loop bounded by a runtime argument under
NumPy 2.

CUDA's default strategy for C <= 128 where Triton is installed
(:func:`bionets.layers.quadratic.set_cuda_strategy`). Tested against the float64 formula on the CPU
under Triton's interpreter (``TRITON_INTERPRET=1``) and against the 'blocks' strategy on an H200
(float32 and bf16, eager and compiled, CUDA graphs included). Measured there: the training step of
Dit-ConvNeXt-T's C = 96 layer 6.5x faster than all C^2 products eager (1.97x under CUDA graphs),
Dit-ConvNeXt-T 1.13x its twin eager and 1.20x under CUDA graphs (benchmarks/RESULTS.md). The first
version of this strategy, which gathered each product's two factors one column at a time, did not pay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bionets.layers.triton_kernels import launch_device

WIDTH = 8    # block width W: a [64, 64] outer product per pair and row tile stays in registers
SPLIT_PROGRAMS = 1024    # dL/dS: the rows split over about this many programs (enough to fill a GPU)


@triton.jit
def _block_products_matmul_kernel(u_ptr, w_ptr, rhs_ptr, out_ptr, M, CU, CW, N, stride_u, stride_w,
                                  NA: tl.constexpr, NB: tl.constexpr, TRIANGLE: tl.constexpr, W: tl.constexpr,
                                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = sum_p sum_(s,t) u[m, a_p W + s] w[m, b_p W + t] rhs[(p W + s) W + t, n] over the pairs
    p = (a, b) of blocks a < NA, b < NB, row-major, b >= a only if TRIANGLE; columns of u at or
    beyond CU (of w: CW) read as 0."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64, in_rows, in_cols = rows.to(tl.int64), rows < M, cols < N
    lane, flat = tl.arange(0, W), tl.arange(0, W * W)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for a in tl.static_range(NA):                 # unrolled: the inner loop's bounds are constants
        ca = a * W + lane
        xa = tl.load(u_ptr + rows64[:, None] * stride_u + ca[None, :], mask=in_rows[:, None] & (ca < CU)[None, :],
                     other=0.0).to(tl.float32)
        first, pair0 = 0, a * NB                  # first b; the pair (a, b) is pair0 + b
        if TRIANGLE:                              # a statement: the 3.6 interpreter makes a ternary a tensor
            first, pair0 = a, a * NB - a * (a - 1) // 2 - a
        for b in range(first, NB):
            cb = b * W + lane
            xb = tl.load(w_ptr + rows64[:, None] * stride_w + cb[None, :], mask=in_rows[:, None] & (cb < CW)[None, :],
                         other=0.0).to(tl.float32)
            left = tl.reshape(xa[:, :, None] * xb[:, None, :], (BLOCK_M, W * W))
            right = tl.load(rhs_ptr + ((pair0 + b) * W * W + flat)[:, None].to(tl.int64) * N + cols[None, :],
                            mask=in_cols[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(left, right.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(left.to(right.dtype), right)
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _block_products_t_matmul_kernel(x_ptr, g_ptr, part_ptr, M, C, N, stride_x, NB: tl.constexpr,
                                    STEPS: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr):
    """part[split, (p W + s) W + t, n] = sum over this split's rows m of x[m, a W + s] x[m, b W + t] g[m, n]
    for the p-th block pair (a, b <= NB, b >= a, row-major); a split is STEPS row blocks; columns of x
    at or beyond C read as 0."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    lane, flat = tl.arange(0, W), tl.arange(0, W * W)
    a = p * 0
    for k in tl.static_range(1, NB):               # a = the number of rows k > 0 that start at or before p
        a += (p >= k * NB - k * (k - 1) // 2).to(a.dtype)
    b = p - (a * NB - a * (a - 1) // 2) + a
    ca, cb = a * W + lane, b * W + lane
    acc = tl.zeros([W * W, BLOCK_N], dtype=tl.float32)
    for step in range(STEPS):
        rows = (split * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64, in_rows = rows.to(tl.int64), rows < M
        xa = tl.load(x_ptr + rows64[:, None] * stride_x + ca[None, :], mask=in_rows[:, None] & (ca < C)[None, :],
                     other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + rows64[:, None] * stride_x + cb[None, :], mask=in_rows[:, None] & (cb < C)[None, :],
                     other=0.0).to(tl.float32)
        left = tl.trans(tl.reshape(xa[:, :, None] * xb[:, None, :], (BLOCK_M, W * W)))
        g = tl.load(g_ptr + rows64[:, None] * N + cols[None, :], mask=in_rows[:, None] & (cols < N)[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(left, g.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(left.to(g.dtype), g)
    tl.store(part_ptr + (split.to(tl.int64) * tl.num_programs(0) * W * W + p * W * W + flat[:, None]) * N
             + cols[None, :], acc, mask=(cols < N)[None, :])


def _block_n(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _blocks(c: int) -> int:
    return triton.cdiv(c, WIDTH)


def block_products_matmul(u: torch.Tensor, w: torch.Tensor, rhs: torch.Tensor, triangle: bool) -> torch.Tensor:
    """``out[m, n] = sum_(p,s,t) u[m, a_p W + s] w[m, b_p W + t] rhs[(p W + s) W + t, n]`` for row-major
    u [M, *], w [M, *] and rhs [pairs W^2, N] (W = :data:`WIDTH`), over the block pairs (a, b) of u's
    and w's blocks, row-major, only b >= a if ``triangle``; out has rhs's dtype."""
    u, w, rhs = u.contiguous(), w.contiguous(), rhs.contiguous()
    m, n = u.shape[0], rhs.shape[1]
    out = torch.empty(m, n, dtype=rhs.dtype, device=u.device)
    if not m:
        return out
    block_m, block_n = 64, _block_n(n, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    with launch_device(u):
        _block_products_matmul_kernel[grid](u, w, rhs, out, m, u.shape[1], w.shape[1], n, u.stride(0), w.stride(0),
                                            NA=_blocks(u.shape[1]), NB=_blocks(w.shape[1]), TRIANGLE=int(triangle),
                                            W=WIDTH, IEEE=rhs.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def block_products_t_matmul(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[(p W + s) W + t, n] = sum_m x[m, a_p W + s] x[m, b_p W + t] g[m, n]`` over the block pairs
    a <= b (row-major) in float32, the rows split over enough programs to fill the GPU (per-split
    partial sums, then one torch sum)."""
    x, g = x.contiguous(), g.contiguous()
    nb = _blocks(x.shape[1])
    m, n, pairs = x.shape[0], g.shape[1], nb * (nb + 1) // 2
    if not m:
        return torch.zeros(pairs * WIDTH * WIDTH, n, dtype=torch.float32, device=x.device)
    block_m, block_n = 64, _block_n(n, 64)
    tiles = pairs * triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(m, block_m), SPLIT_PROGRAMS // tiles))
    steps = triton.next_power_of_2(triton.cdiv(triton.cdiv(m, splits), block_m))   # few distinct compiles
    splits = triton.cdiv(m, steps * block_m)
    part = torch.empty(splits, pairs * WIDTH * WIDTH, n, dtype=torch.float32, device=x.device)
    grid = (pairs, triton.cdiv(n, block_n), splits)
    with launch_device(x):
        _block_products_t_matmul_kernel[grid](x, g, part, m, x.shape[1], n, x.stride(0), NB=nb, STEPS=steps, W=WIDTH,
                                              IEEE=g.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n)
    return part.sum(0)


# ---------------------------------------------------------------- the 'fused' strategy of the sym form

def _pad(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded at the end of each dimension in ``dims`` to a multiple of W (``t`` itself
    where no padding is needed: a zero pad still copies, one kernel launch each way)."""
    pad = [0] * (2 * t.dim())
    for d in dims:
        pad[2 * (t.dim() - 1 - d) + 1] = _blocks(t.shape[d]) * WIDTH - t.shape[d]
    return torch.nn.functional.pad(t, pad) if any(pad) else t


def fold(q: torch.Tensor) -> torch.Tensor:
    """S [rows of the block layout, C_out] of Q [C_out, C, C]: ``S_ij = Q_ij + Q_ji`` for i < j,
    ``Q_ii`` for i = j, 0 below the diagonal of a diagonal block and for padded channels. Row
    ((p W + s) W + t) holds channel pair (I_p W + s, J_p W + t) of the p-th block pair I <= J."""
    c_out, nb = q.shape[0], _blocks(q.shape[1])
    q = _pad(q, (1, 2))
    upper = torch.triu(q + q.transpose(1, 2), 1) + torch.diag_embed(q.diagonal(0, 1, 2))
    i, j = torch.triu_indices(nb, nb, device=q.device)
    return upper.view(c_out, nb, WIDTH, nb, WIDTH).permute(1, 3, 2, 4, 0)[i, j].reshape(-1, c_out)


def pairs(c: int) -> tuple[list[int], list[int]]:
    """The channel pair (i, j) of every row of :func:`fold`'s S; a padded channel (its rows are zero)
    given as channel C - 1, so that x_i x_j exists for every row."""
    nb, last = _blocks(c), c - 1
    blocks = [(a, b) for a in range(nb) for b in range(a, nb)]
    i = [min(a * WIDTH + u, last) for a, b in blocks for u in range(WIDTH) for _ in range(WIDTH)]
    j = [min(b * WIDTH + v, last) for a, b in blocks for _ in range(WIDTH) for v in range(WIDTH)]
    return i, j


def _unfold(s: torch.Tensor, c: int) -> torch.Tensor:
    """The right operand of dL/dx from S (:func:`fold`): row ((p W + s) W + t) of the p-th block pair
    (O, J) holds ``T_o[j, :]`` for o = O W + s, j = J W + t, where T_o = Q_o + Q_o^T (C padded columns)."""
    c_out, nb = s.shape[1], _blocks(c)
    i, j = torch.triu_indices(nb, nb, device=s.device)
    upper = s.new_zeros(nb, nb, WIDTH, WIDTH, c_out)
    upper[i, j] = s.view(-1, WIDTH, WIDTH, c_out)
    upper = upper.permute(0, 2, 1, 3, 4).reshape(nb * WIDTH, nb * WIDTH, c_out)      # U[i, j, o], i <= j
    t = _pad((upper + upper.transpose(0, 1)).permute(2, 0, 1), (0,))                 # T[o, j, c], O padded
    return t.view(-1, WIDTH, nb, WIDTH, nb * WIDTH).transpose(1, 2).reshape(-1, nb * WIDTH)


def forward(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q[m, o] = sum_(i<=j) S_ij,o x[m, i] x[m, j]`` over the block layout (:func:`fold`)."""
    return block_products_matmul(rows, rows, s, triangle=True)


def backward(rows: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, want_x: bool,
             want_s: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx, dL/dS) of :func:`forward`, None where not wanted: ``dS = sum_m x_i x_j g`` and
    ``dx[m, c] = sum_(o,j) g[m, o] x[m, j] T_ojc`` (T_o = Q_o + Q_o^T, unfolded from S)."""
    c = rows.shape[1]
    grad_s = block_products_t_matmul(rows, grad).to(s.dtype) if want_s else None
    grad_x = None
    if want_x:
        grad_x = block_products_matmul(grad, rows, _unfold(s, c), triangle=False)[:, :c].contiguous()  # padded C: a copy
    return grad_x, grad_s
