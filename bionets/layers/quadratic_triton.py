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

Loop bounds are compile-time constants (the pair count; the row blocks per program of dL/dS):
Triton 3.6's interpreter cannot run a loop bounded by a runtime argument under NumPy 2.

Experimental: tested on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against the
float64 formula; chosen with ``bionets.layers.quadratic.set_cuda_strategy('fused')``. The previous
version of this strategy, which gathered each product's two factors one column at a time, was
measured on an H200 and did not pay (benchmarks/RESULTS.md); this one has not yet run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bionets.layers.quadratic import fold_symmetric   # quadratic.py imports this module lazily: no cycle

WIDTH = 8    # block width W: a [64, 64] outer product per pair and row tile stays in registers


@triton.jit
def _block_products_matmul_kernel(u_ptr, w_ptr, a_ptr, b_ptr, rhs_ptr, out_ptr, M, CU, CW, N, stride_u, stride_w,
                                  PAIRS: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr):
    """out[m, n] = sum_p sum_(s,t) u[m, a_p W + s] w[m, b_p W + t] rhs[(p W + s) W + t, n]; columns of u at
    or beyond CU (of w: CW) read as 0."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64, in_rows, in_cols = rows.to(tl.int64), rows < M, cols < N
    lane, flat = tl.arange(0, W), tl.arange(0, W * W)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for p in range(PAIRS):
        ca = tl.load(a_ptr + p) * W + lane
        cb = tl.load(b_ptr + p) * W + lane
        xa = tl.load(u_ptr + rows64[:, None] * stride_u + ca[None, :], mask=in_rows[:, None] & (ca < CU)[None, :],
                     other=0.0).to(tl.float32)
        xb = tl.load(w_ptr + rows64[:, None] * stride_w + cb[None, :], mask=in_rows[:, None] & (cb < CW)[None, :],
                     other=0.0).to(tl.float32)
        left = tl.reshape(xa[:, :, None] * xb[:, None, :], (BLOCK_M, W * W))
        right = tl.load(rhs_ptr + (p * W * W + flat)[:, None].to(tl.int64) * N + cols[None, :], mask=in_cols[None, :],
                        other=0.0)
        if IEEE:
            acc += tl.dot(left, right.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(left.to(right.dtype), right)
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _block_products_t_matmul_kernel(x_ptr, a_ptr, b_ptr, g_ptr, part_ptr, M, C, N, stride_x, STEPS: tl.constexpr,
                                    W: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr):
    """part[split, (p W + s) W + t, n] = sum over this split's rows m of x[m, a_p W + s] x[m, b_p W + t] g[m, n];
    a split is STEPS row blocks; columns of x at or beyond C read as 0."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    lane, flat = tl.arange(0, W), tl.arange(0, W * W)
    ca = tl.load(a_ptr + p) * W + lane
    cb = tl.load(b_ptr + p) * W + lane
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


def block_products_matmul(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          rhs: torch.Tensor) -> torch.Tensor:
    """``out[m, n] = sum_(p,s,t) u[m, a_p W + s] w[m, b_p W + t] rhs[(p W + s) W + t, n]`` for row-major
    u [M, *], w [M, *] and rhs [len(a) W^2, N] (W = :data:`WIDTH`); out has rhs's dtype."""
    u, w, rhs = u.contiguous(), w.contiguous(), rhs.contiguous()
    m, n = u.shape[0], rhs.shape[1]
    out = torch.empty(m, n, dtype=rhs.dtype, device=u.device)
    if not m:
        return out
    block_m, block_n = 64, _block_n(n, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _block_products_matmul_kernel[grid](u, w, a, b, rhs, out, m, u.shape[1], w.shape[1], n, u.stride(0), w.stride(0),
                                        PAIRS=a.numel(), W=WIDTH, IEEE=rhs.dtype == torch.float32,
                                        BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def block_products_t_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[(p W + s) W + t, n] = sum_m x[m, a_p W + s] x[m, b_p W + t] g[m, n]`` in float32, the rows split
    over enough programs to fill the GPU (per-split partial sums, then one torch sum)."""
    x, g = x.contiguous(), g.contiguous()
    m, n, k = x.shape[0], g.shape[1], a.numel() * WIDTH * WIDTH
    if not m:
        return torch.zeros(k, n, dtype=torch.float32, device=x.device)
    block_m, block_n = 64, _block_n(n, 64)
    tiles = a.numel() * triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(m, block_m), 1024 // tiles))
    steps = triton.next_power_of_2(triton.cdiv(triton.cdiv(m, splits), block_m))   # few distinct compiles
    splits = triton.cdiv(m, steps * block_m)
    part = torch.empty(splits, k, n, dtype=torch.float32, device=x.device)
    grid = (a.numel(), triton.cdiv(n, block_n), splits)
    _block_products_t_matmul_kernel[grid](x, a, b, g, part, m, x.shape[1], n, x.stride(0), STEPS=steps, W=WIDTH,
                                          IEEE=g.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n)
    return part.sum(0)


# ---------------------------------------------------------------- the 'fused' strategy of the sym form

_TABLES: dict[tuple, dict[str, torch.Tensor]] = {}


def _channel_of_rows(blocks: list[int], first: bool) -> torch.Tensor:
    """For the W x W rows (s, t) of every listed block: its channel ``block W + s`` (``first``) or
    ``block W + t``."""
    lane = torch.arange(WIDTH)
    lane = lane[None, :, None] if first else lane[None, None, :]
    return (torch.tensor(blocks)[:, None, None] * WIDTH + lane).expand(-1, WIDTH, WIDTH).reshape(-1)


def _tables(c: int, c_out: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Index tables of the block layout for C input and C_out output channels, made once per device:
    the forward's block pairs I <= J (``a``, ``b``) and the channel pair (i, j) of each of its
    product rows (in channels padded to NB W); dL/dx's pairs (O, J) over all output and input blocks
    (``ga``, ``gb``) and, for each of its rows, the output channel o and input channel j; ``pos`` /
    ``diag``: the forward row of the channel pair (min, max) and 1 + [i == j]."""
    key = (c, c_out, str(device))
    if key not in _TABLES:
        w = WIDTH
        nb, nbo = triton.cdiv(c, w), triton.cdiv(c_out, w)
        a = [p for p in range(nb) for _ in range(p, nb)]
        b = [q for p in range(nb) for q in range(p, nb)]
        ga = [o for o in range(nbo) for _ in range(nb)]
        gb = [q for _ in range(nbo) for q in range(nb)]
        row_of_pair = {pair: k for k, pair in enumerate(zip(a, b))}
        block_pair = torch.tensor([[row_of_pair[min(p, q), max(p, q)] for q in range(nb)] for p in range(nb)])
        ch = torch.arange(nb * w)
        lo, hi = torch.minimum(ch[:, None], ch[None, :]), torch.maximum(ch[:, None], ch[None, :])
        tables = {"a": torch.tensor(a, dtype=torch.int32), "b": torch.tensor(b, dtype=torch.int32),
                  "ga": torch.tensor(ga, dtype=torch.int32), "gb": torch.tensor(gb, dtype=torch.int32),
                  "i": _channel_of_rows(a, True), "j": _channel_of_rows(b, False),
                  "grad_o": _channel_of_rows(ga, True), "grad_j": _channel_of_rows(gb, False),
                  "pos": block_pair[lo // w, hi // w] * w * w + (lo % w) * w + hi % w, "diag": 1 + torch.eye(nb * w)}
        _TABLES[key] = {k: v.to(device) for k, v in tables.items()}
    return _TABLES[key]


def fold(q: torch.Tensor) -> torch.Tensor:
    """S [rows of the block layout, C_out] of Q [C_out, C, C]: ``S_ij = Q_ij + Q_ji`` for i < j,
    ``Q_ii`` for i = j, 0 below the diagonal of a diagonal block and for padded channels."""
    c_out, c = q.shape[:2]
    t = _tables(c, c_out, q.device)
    pad = triton.cdiv(c, WIDTH) * WIDTH - c
    return fold_symmetric(torch.nn.functional.pad(q, (0, pad, 0, pad)), t["i"], t["j"])


def forward(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q[m, o] = sum_(i<=j) S_ij,o x[m, i] x[m, j]`` over the block layout (:func:`fold`)."""
    t = _tables(rows.shape[1], s.shape[1], rows.device)
    return block_products_matmul(rows, rows, t["a"], t["b"], s)


def backward(rows: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, want_x: bool,
             want_s: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx, dL/dS) of :func:`forward`, None where not wanted: ``dS = sum_m x_i x_j g`` and
    ``dx[m, c] = sum_(o,j) g[m, o] x[m, j] T_ojc`` (T_o = Q_o + Q_o^T, unfolded from S)."""
    c, c_out = rows.shape[1], s.shape[1]
    t = _tables(c, c_out, rows.device)
    grad_s = block_products_t_matmul(rows, t["a"], t["b"], grad).to(s.dtype) if want_s else None
    grad_x = None
    if want_x:
        st = torch.nn.functional.pad(s.t(), (0, 0, 0, triton.cdiv(c_out, WIDTH) * WIDTH - c_out))  # [O padded, rows]
        unfolded = st[t["grad_o"][:, None], t["pos"][t["grad_j"]]] * t["diag"][t["grad_j"]].to(s.dtype)
        grad_x = block_products_matmul(grad, rows, t["ga"], t["gb"], unfolded)[:, :c].contiguous()  # padded C: a copy
    return grad_x, grad_s
