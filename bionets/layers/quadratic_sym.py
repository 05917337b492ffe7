"""The symmetric form of the channel-wise quadratic term, ``sum_(i<=j) S_ij x_i x_j`` per row, as
PyTorch kernels and the wrappers that run it: an autograd function for eager mode and a torch
operator (``bionets::sym_quadratic``) for compiled models. :mod:`bionets.layers.quadratic` picks the
strategy and folds Q into S; the 'fused' strategy's Triton kernels are in
:mod:`bionets.layers.quadratic_triton`.
"""
from __future__ import annotations

import functools

import torch

from bionets.layers import cpu_kernels
from bionets.layers.kernel_fallback import differentiable_backward
from bionets.layers.scratch import scratch
from bionets.layers.triton_kernels import triton_kernels


# How the symmetric form is computed. 'rows' (CPU): exactly the C(C+1)/2 pairs i <= j, in the
# row-major order of ``torch.triu_indices``; for float32, C++ kernels (``quadratic_cpu.cpp``) that
# split the rows into blocks, each thread forming a block's products in its own cache-sized buffer
# and passing them to a matmul (q = P S, dL/dS = P^T g, dL/dP = g S^T, unfolded into dL/dx); without
# those kernels (float64, no compiler), one small matmul per triangle row i with the products
# ``x_i * x[i:]`` (they stay in cache). 'blocks' (GPU without Triton, or wider than 'fused' goes):
# the channels in b blocks of width w; for every block pair I <= J the outer product of x_I and x_J
# (one broadcast multiply for all pairs, no per-product gather or atomic add), then one matmul;
# the lower triangle of a diagonal block is formed with zero weight, so C^2 (b+1)/(2b) products. b = 2 for even C >= 64 (3/4 of C^2:
# 6,912 at C = 96), else b = 1: measured on an H100 (bf16, C = 96, 56x56, batch 64), eager
# PyTorch's batched products run fastest with blocks this wide (16.7 ms per training step of the
# layer against 22.7 ms at w = 12, C(C+1)/2-close, and 38 ms for all C^2 products with the
# reference's saved outer product). Both strategies save only x and S and recompute the products
# in backward.


def triton_module():
    """:mod:`bionets.layers.quadratic_triton`, or None where Triton is not installed."""
    return triton_kernels("quadratic_triton")


@functools.lru_cache(maxsize=None)
def _triangle(c: int) -> tuple[list[int], list[int]]:
    """The pairs (i, j), i <= j, row-major, as Python lists (tensors made from them are constants
    to torch.jit.trace and the ONNX exporters)."""
    return [i for i in range(c) for _ in range(i, c)], [j for i in range(c) for j in range(i, c)]


def _block_width(c: int) -> int:
    """w = C/2 for even C >= 64, else C."""
    return c // 2 if c % 2 == 0 and c >= 64 else c


@functools.lru_cache(maxsize=None)
def _blocks(c: int) -> tuple[int, list[int], list[int], list[int], list[int]]:
    """Block width w (:func:`_block_width`), block pairs (I, J), I <= J, and the channel pair (i, j)
    of every product they form, in order."""
    w = _block_width(c)
    nb = c // w
    bi = [a for a in range(nb) for _ in range(a, nb)]
    bj = [b for a in range(nb) for b in range(a, nb)]
    i = [a * w + u for a, b in zip(bi, bj) for u in range(w) for _ in range(w)]
    j = [b * w + v for a, b in zip(bi, bj) for _ in range(w) for v in range(w)]
    return w, bi, bj, i, j


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def indices(c: int, strategy: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(i, j) of the strategy's products, plus (I, J) of its block pairs for 'blocks', as tensors on
    ``device``, made once (no host-to-device copy per step). While tracing or exporting they are made
    afresh, and the graph records them as constants (from the uncached functions under
    torch.compile, which warns on every lru_cache call it traces)."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    triangle, blocks = (_triangle.__wrapped__, _blocks.__wrapped__) if tracing else (_triangle, _blocks)
    lists = triangle(c) if strategy == "rows" else blocks(c)[3:] + blocks(c)[1:3]
    if tracing:
        return tuple(torch.tensor(v, dtype=torch.long, device=device) for v in lists)
    key = (c, strategy, str(device))
    if key not in _INDEX_CACHE:
        with torch.inference_mode(False):     # made in inference mode, autograd could not use them later
            _INDEX_CACHE[key] = tuple(torch.tensor(v, dtype=torch.long, device=device) for v in lists)
    return _INDEX_CACHE[key]


def fold_symmetric(q: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The weight S [P, C_out] of the products x_i x_j listed by (i, j):
    ``S_ij = Q_ij + Q_ji`` for i < j, ``S_ii = Q_ii``, 0 for i > j."""
    return ((q[:, i, j] + q[:, j, i] * (i != j)) * (i <= j)).t()


def _unfold_symmetric(s: torch.Tensor, c: int) -> torch.Tensor:
    """T [C_out, C, C] from the folded S [C(C+1)/2, C_out] of the 'rows' order:
    ``T_oij = T_oji = S_ij`` for i < j, ``T_oii = 2 S_ii`` (T_o = Q_o + Q_o^T, dq_o/dx = T_o x)."""
    pair, diag = _pair_index(c, s.device)
    return s.t()[:, pair] * diag.to(s.dtype)      # 1 and 2: exact in any float dtype


@functools.lru_cache(maxsize=None)
def _pair_index(c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (i, j): the position of (min, max) among the 'rows' products, and 2 on the diagonal."""
    with torch.inference_mode(False):         # cached: usable by autograd whatever mode made them
        i, j = torch.triu_indices(c, c)
        pair = torch.empty(c, c, dtype=torch.long)
        pair[i, j] = pair[j, i] = torch.arange(i.numel())
        return pair.to(device), (1 + torch.eye(c)).to(device)


def _chunks(rows: torch.Tensor, per_row: int, cpu_rows: int = 4096):
    """Row ranges: ``cpu_rows`` rows on the CPU (each caller picks; 4,096 by default); on the GPU
    about 128M elements of buffers that hold ``per_row`` elements a row."""
    step = cpu_rows if rows.device.type == "cpu" else max(1, 2**27 // per_row)
    return [slice(r0, r0 + step) for r0 in range(0, rows.shape[0], step)]


def _row_offsets(c: int) -> list[int]:
    """Start of triangle row i (the pairs (i, j >= i)) among the C(C+1)/2 products."""
    return [i * c - i * (i - 1) // 2 for i in range(c + 1)]


def _block_products(x: torch.Tensor, w: int, bi: torch.Tensor, bj: torch.Tensor) -> torch.Tensor:
    """x [m, C] -> the products x_I[u] x_J[v] of every block pair (I, J): [m, pairs*w*w]."""
    xb = x.view(x.shape[0], -1, w)
    return (xb[:, bi].unsqueeze(3) * xb[:, bj].unsqueeze(2)).flatten(1)


def _block_grad_x(x: torch.Tensor, gp: torch.Tensor, w: int, bi: torch.Tensor, bj: torch.Tensor) -> torch.Tensor:
    """dL/dx [m, C] from dL/d(x_I[u] x_J[v]) ``gp`` [m, pairs*w*w]: x_J[v] dx_I[u] + x_I[u] dx_J[v]."""
    m = x.shape[0]
    xb = x.view(m, -1, w)
    xi, xj = xb[:, bi], xb[:, bj]
    gp = gp.view(m, -1, w, w)
    grad = torch.zeros_like(xb)
    grad.index_add_(1, bi, (gp @ xj.unsqueeze(3)).squeeze(3))
    grad.index_add_(1, bj, (xi.unsqueeze(2) @ gp).squeeze(2))
    return grad.view(m, -1)


def _cpu_kernels(rows: torch.Tensor, s: torch.Tensor):
    """The C++ kernels of ``quadratic_cpu.cpp`` (:mod:`bionets.layers.cpu_kernels`) where they take
    these rows (float32 on the CPU, each row contiguous; S float32, or bf16 for bf16 products and
    matmuls), else None."""
    if (rows.device.type != "cpu" or rows.dtype != torch.float32 or s.dtype not in (torch.float32, torch.bfloat16)
            or rows.stride(1) != 1):
        return None
    return cpu_kernels.ops("quadratic_cpu")


def _block_rows(k: int) -> int:
    """Rows per block of the C++ kernels: a block's K products fill ~2 MB. Against the previous
    kernels (Python chunks of ~4 MB of products shared by both threads, each matmul threaded by MKL),
    on 2 cores, the layer's forward and backward took 0.71x the time at C = 16 (32x32 maps, batch
    128), 0.78x at C = 32, 0.85x at C = 64 and 0.84x at C = 96 (56x56, batch 8); 2^19 elements a
    block measured as fast as or faster than 2^15 ... 2^21 at those sizes."""
    return max(8, 2**19 // k)


def _kernel_work(rows: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(each working thread's products buffer in S's dtype, one after the other; rows per block;
    working threads: at most one a block) for the C++ kernels."""
    k = s.shape[0]
    block = _block_rows(k)
    threads = max(1, min(torch.get_num_threads(), -(-rows.shape[0] // block)))
    return scratch("block_products", (threads * block * k,), s), block, threads


def sym_forward(rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
    """``sum_{(i,j)} S_ij x_i x_j`` over the strategy's products, chunk by chunk of rows."""
    m, c = rows.shape
    if strategy == "fused":
        return triton_module().forward(rows, s)
    out = rows.new_empty(m, s.shape[1], dtype=s.dtype)   # S's dtype: bf16 S on the CPU asks for bf16 products
    if strategy == "blocks":
        w, (bi, bj) = _block_width(c), indices(c, "blocks", rows.device)[2:]
        for r in _chunks(rows, s.shape[0]):
            torch.mm(_block_products(rows[r], w, bi, bj), s, out=out[r])
        return out
    if (kernels := _cpu_kernels(rows, s)) is not None:
        kernels.forward(rows, s, out, *_kernel_work(rows, s)[:2])
        return out
    offs = _row_offsets(c)
    # the CPU buffer holds one triangle row's products: larger chunks, fewer small kernels (the forward
    # of Dit-ResNet-20's layer measured 15 -> 11 ms with 2^20 elements a chunk instead of 4,096 rows)
    for r in _chunks(rows, c, cpu_rows=max(4096, 2**20 // c)):
        x, o = rows[r], out[r]
        tmp = scratch("row_products", (x.shape[0], c), x)
        torch.mm(torch.mul(x[:, :1], x, out=tmp), s[:c], out=o)
        for i in range(1, c):
            o.addmm_(torch.mul(x[:, i:i + 1], x[:, i:], out=tmp[:, :c - i]), s[offs[i]:offs[i + 1]])
    return out


def sym_backward(rows: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, strategy: str, want_x: bool,
                  want_s: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx, dL/dS) of :func:`sym_forward`, recomputing the products chunk by chunk instead of
    saving them: ``dL/dS_ij = sum g x_i x_j``; ``dL/dx = sum_o g_o T_o x`` with T_o = Q_o + Q_o^T.
    Each is None where not wanted."""
    c = rows.shape[1]
    if strategy == "rows" and (kernels := _cpu_kernels(rows, s)) is not None:
        # g, dL/dS and the products in S's dtype; dL/dS: each thread's sum over its blocks (float32),
        # then the threads' sums in order
        grad = grad.to(s.dtype)
        grad_x, grad_s = rows.new_empty(rows.shape if want_x else (0,)), s.new_empty(s.shape if want_s else (0,))
        work, block, threads = _kernel_work(rows, s)
        partial = scratch("grad_s_parts", (threads, *s.shape), rows)
        kernels.backward(rows, s, grad, grad_x, grad_s, work, partial, block)
        return (grad_x if want_x else None), (grad_s if want_s else None)
    grad = grad.to(rows.dtype)
    if strategy == "fused":
        return triton_module().backward(rows, s, grad, want_x, want_s)
    grad_s = torch.zeros(s.shape, dtype=torch.promote_types(s.dtype, torch.float32), device=s.device) if want_s else None
    if strategy == "rows":
        if want_s:
            _rows_grad_s(rows, grad, s, out=grad_s)
        grad_x = _rows_grad_x(rows, grad, s) if want_x else None
    else:
        grad_x = torch.zeros_like(rows) if want_x else None
        w, (bi, bj) = _block_width(c), indices(c, "blocks", rows.device)[2:]
        for r in _chunks(rows, s.shape[0]):
            x, g = rows[r], grad[r]
            if want_s:
                grad_s += (_block_products(x, w, bi, bj).t() @ g).to(grad_s.dtype)
            if want_x:
                grad_x[r] = _block_grad_x(x, g @ s.t(), w, bi, bj)    # g @ S^T: dL/d(x_I[u] x_J[v])
    return grad_x, (grad_s.to(s.dtype) if want_s else None)


class SymmetricQuadratic(torch.autograd.Function):
    """:func:`sym_forward` with :func:`sym_backward` (the products recomputed, not saved)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
        ctx.save_for_backward(rows, s)
        ctx.strategy = strategy
        return sym_forward(rows, s, strategy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, s = ctx.saved_tensors
        if torch.is_grad_enabled():                   # create_graph=True: a backward autograd can differentiate
            i, j = product_pairs(rows.shape[1], ctx.strategy, rows.device)
            return (*differentiable_backward(lambda x, s: (x[:, i] * x[:, j]).to(s.dtype) @ s, (rows, s),
                                             ctx.needs_input_grad[:2], grad), None)
        return *sym_backward(rows, s, grad, ctx.strategy, *ctx.needs_input_grad[:2]), None


def product_pairs(c: int, strategy: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel pair (i, j) of every row of the strategy's folded S (for the plain expression
    ``(x[:, i] * x[:, j]) @ S``)."""
    if strategy == "fused":
        return tuple(torch.tensor(v, dtype=torch.long, device=device) for v in triton_module().pairs(c))
    return indices(c, strategy, device)[:2]


# Inside a compiled model the sym form is one opaque operator, run by the kernels above, on the CPU
# (traced, its chunk loops unrolled into a graph that took ~45 s to compile for Dit-ResNet-20 on 2
# CPU cores and ran slower than these kernels) and with the 'fused' strategy (Triton kernels, also
# inside CUDA graphs). CUDA's 'blocks' strategy is traced: Inductor's kernels for it were measured
# faster under CUDA graphs than the eager ones.

@torch.library.custom_op("bionets::sym_quadratic", mutates_args=())
def sym_quadratic_op(rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
    """``sum_{(i,j)} S_ij x_i x_j`` for every row (:func:`sym_forward`) as a torch operator."""
    return sym_forward(rows, s, strategy)


@sym_quadratic_op.register_fake
def _(rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], s.shape[1], dtype=s.dtype)


@torch.library.custom_op("bionets::sym_quadratic_backward", mutates_args=())
def sym_quadratic_backward_op(rows: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, strategy: str, want_x: bool,
                              want_s: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sym_backward` as a torch operator; a gradient not wanted comes back empty."""
    grad_x, grad_s = sym_backward(rows, s, grad, strategy, want_x, want_s)
    return (rows.new_empty(0) if grad_x is None else grad_x), (s.new_empty(0) if grad_s is None else grad_s)


@sym_quadratic_backward_op.register_fake
def _(rows, s, grad, strategy, want_x, want_s):
    return rows.new_empty(rows.shape if want_x else (0,)), s.new_empty(s.shape if want_s else (0,))


def _op_setup(ctx, inputs, output) -> None:
    rows, s, ctx.strategy = inputs
    ctx.save_for_backward(rows, s)


def _op_backward(ctx, grad: torch.Tensor):
    rows, s = ctx.saved_tensors
    want_x, want_s = ctx.needs_input_grad[:2]
    grad_x, grad_s = sym_quadratic_backward_op(rows, s, grad, ctx.strategy, want_x, want_s)
    return (grad_x if want_x else None), (grad_s if want_s else None), None


sym_quadratic_op.register_autograd(_op_backward, setup_context=_op_setup)


# The CPU backward's layouts were chosen by measurement on the 2-core development machine (float32;
# the matmuls' speed depends on their shapes): for C <= 32 the products for dL/dS are formed as
# [products, rows] (each triangle row one contiguous block; 1.8x faster at C = 32, 1.6x slower at
# C = 96), and for C <= 64 dL/dx comes from the outer products g (x) x (1.4x faster at C = 64,
# 2x at C = 32, slower at C = 96).
_PRODUCTS_BY_COLUMN_MAX_C = 32
_OUTER_GRAD_X_MAX_C = 64


def _rows_grad_s(rows: torch.Tensor, grad: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
    """Adds ``dL/dS_ij = sum_rows g x_i x_j`` [C(C+1)/2, C_out] to ``out``: a chunk's products in
    one buffer, one matmul."""
    c, offs = rows.shape[1], _row_offsets(rows.shape[1])
    by_column = c <= _PRODUCTS_BY_COLUMN_MAX_C
    xt = scratch("columns", (c, rows.shape[0]), rows).copy_(rows.t()) if by_column else None
    for r in _chunks(rows, s.shape[0]):
        if by_column:
            x = xt[:, r]
            b = scratch("products", (s.shape[0], x.shape[1]), x)
            for i in range(c):
                torch.mul(x[i:i + 1], x[i:], out=b[offs[i]:offs[i + 1]])
            part = b @ grad[r]
        else:
            x = rows[r]
            buf = scratch("products", (x.shape[0], s.shape[0]), x)
            for i in range(c):
                torch.mul(x[:, i:i + 1], x[:, i:], out=buf[:, offs[i]:offs[i + 1]])
            part = buf.t() @ grad[r]
        out += part.to(out.dtype)


def _rows_grad_x(rows: torch.Tensor, grad: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``dL/dx = sum_o g_o T_o x`` [M, C], T_o = Q_o + Q_o^T."""
    m, c = rows.shape
    if c <= _OUTER_GRAD_X_MAX_C:
        # dL/dx_k = sum_{o,j} (g_o x_j) T_ojk: the outer products g (x) x of a chunk and one matmul.
        # Twice the multiply-adds of g @ S^T below, but no per-triangle-row vector work after it.
        t = _unfold_symmetric(s, c).reshape(-1, c)                 # [(o, j), k]
        grad_x = rows.new_empty(m, c)
        for r in _chunks(rows, t.shape[0], cpu_rows=max(1, 2**21 // t.shape[0])):   # ~8 MB of outer products
            x = rows[r]
            e = scratch("outer", (x.shape[0], t.shape[0]), x)
            torch.mul(grad[r].unsqueeze(2), x.unsqueeze(1), out=e.view(x.shape[0], -1, c))
            torch.mm(e, t, out=grad_x[r])
        return grad_x
    # dL/d(x_i x_j) = g @ S^T, then x_j dx_i + x_i dx_j, triangle row by triangle row
    grad_x, offs = torch.zeros_like(rows), _row_offsets(c)
    for r in _chunks(rows, s.shape[0]):
        x, g = rows[r], grad[r]
        gp = torch.mm(g, s.t(), out=scratch("products", (x.shape[0], s.shape[0]), x))
        gx = grad_x[r]
        for i in range(c):
            gpi = gp[:, offs[i]:offs[i + 1]]
            gx[:, i] += torch.linalg.vecdot(gpi, x[:, i:])         # x_j dx_i
            gx[:, i:].addcmul_(gpi, x[:, i:i + 1])                 # x_i dx_j
    return grad_x
