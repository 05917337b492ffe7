"""Quadratic (dendritic-integration) neurons of Dit-CNN (Liu et al., NeurIPS 2024).

A biological neuron integrates its dendritic inputs bilinearly::

    y = w . x + x^T A x + b

instead of ``y = w . x + b``. For Gaussian inputs with mean mu and covariance Sigma,
``E[x^T A x] = mu^T A mu + tr(A Sigma)``: the quadratic term sees the inputs' correlations.

* :class:`QuadraticNeuron` is that neuron for vectors (the theory experiments), with A full or
  low-rank.
* :class:`QuadraticChannel` is the channel-wise quadratic term of the Dit convolutional blocks:
  one quadratic form over the channels at every pixel.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from bionets.errors import BionetsError, unknown
from bionets.layers.scratch import scratch
from bionets.layers.triton_kernels import run_or_warn, triton_kernels


class QuadraticNeuron(nn.Module):
    """``out_features`` quadratic neurons on vectors: ``y_o = w_o . x + x^T A_o x + b_o``.

    Args:
        in_features: length of x.
        out_features: number of neurons o.
        rank: ``None`` for a full ``A`` (parameter ``A_full`` of shape [out, in, in]); an integer
            ``r`` (1 <= r <= in_features) for the low-rank form ``A_o = U_o V_o^T`` with parameters
            ``U`` and ``V`` of shape [out, in, r], so that ``x^T A_o x = sum_r (x.U_or)(x.V_or)``.
        bias: learn ``b``.

    Initialization: ``w`` and ``b`` as :class:`torch.nn.Linear`; ``A = 0``, so the neuron starts as
    a linear one (as the Dit networks start as their plain twins). In the full form ``A_full`` is
    zero; in the low-rank form ``V`` is zero and ``U`` is drawn like a linear layer's weight
    (uniform +-1/sqrt(in)), so that ``A = U V^T = 0`` yet the gradient reaching ``V`` is not zero
    (``U = V = 0`` would be a saddle point that gradient descent never leaves).

    ``A`` is stored unsymmetrized: only its symmetric part affects the output.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise BionetsError(f"QuadraticNeuron needs in_features >= 1 and out_features >= 1, "
                               f"got {in_features} and {out_features}")
        if rank is not None and not 1 <= rank <= in_features:
            raise BionetsError(f"QuadraticNeuron rank={rank} must be between 1 and in_features={in_features} "
                               "(or None for a full A)")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        if rank is None:
            self.A_full = nn.Parameter(torch.zeros(out_features, in_features, in_features))
        else:
            bound = 1.0 / math.sqrt(in_features)
            self.U = nn.Parameter(torch.empty(out_features, in_features, rank).uniform_(-bound, bound))
            self.V = nn.Parameter(torch.zeros(out_features, in_features, rank))

    @property
    def A(self) -> torch.Tensor:
        """The dense matrices A_o, shape [out, in, in] (``U V^T`` in the low-rank form)."""
        if self.rank is None:
            return self.A_full
        return self.U @ self.V.transpose(1, 2)

    @property
    def extra_params(self) -> int:
        """Parameters of the quadratic term (beyond the linear neuron's w and b)."""
        if self.rank is None:
            return self.A_full.numel()
        return self.U.numel() + self.V.numel()

    def quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """``x^T A_o x`` for every row of x [N, in] and neuron o: [N, out]."""
        n, d = x.shape
        if self.rank is None:
            # (x A_o)_j = sum_i x_i A_oij for every o at once, then dot with x.
            xa = (x @ self.A_full.permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, d)
            return (xa * x.unsqueeze(1)).sum(-1)
        xu = (x @ self.U.permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, self.rank)
        xv = (x @ self.V.permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, self.rank)
        return (xu * xv).sum(-1)   # sum_r (x.U_or)(x.V_or)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise BionetsError(f"QuadraticNeuron expects input [N, {self.in_features}], got {list(x.shape)}")
        return self.linear(x) + self.quadratic(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class QuadraticTerm(nn.Module):
    """Base of the quadratic terms added to a convolutional block (channel-wise and pixel-wise).

    ``enabled = False`` switches the term off (its output becomes zero): the paper's per-block
    inference ablation that removes ``x^T A x`` from a trained network (see :func:`set_quadratic`).
    """

    enabled: bool

    @property
    def extra_params(self) -> int:
        """Parameters this term adds to its block."""
        return sum(p.numel() for p in self.parameters())


ABLATIONS = ("none", "cov")
IMPLS = ("sym", "full")


class QuadraticChannel(QuadraticTerm):
    """The channel-wise quadratic term of Dit-CNN: a quadratic form over the channels at each pixel.

    For a map x of C_in channels, at every pixel p and output channel o::

        q_o(p) = sum_{i,j} Q[o, i, j] x_i(p) x_j(p)                      (Dit-CNN, Liu et al. 2024)

    ``weight`` is the full Q, shape (C_out, C_in, C_in) (the reference stores the same numbers as
    C_out x C_in^2: ``weight.view(C_out, -1)``), initialized to zero so that a Dit network starts as
    its plain twin. No bias, no spatial kernel (the reference's kernel/stride/padding are ignored).

    Only Q's symmetric part matters, so ``impl='sym'`` (default) computes with the folded upper
    triangle ``S_ij = Q_ij + Q_ji (i < j), S_ii = Q_ii`` and the C(C+1)/2 distinct products
    ``x_i x_j (i <= j)`` (on CPU exactly these, half the multiply-adds of ``impl='full'``; on GPU
    the products of 8-channel block pairs I <= J, formed inside Triton matmul kernels, or without
    Triton the products of two channel blocks, 3/4 of C^2: see :func:`set_cuda_strategy`), without
    saving them for backward. ``impl='full'`` forms all C^2 products (the
    reference's batched outer product, kept as the slow reference). Both give Q the same gradient,
    ``dL/dQ_oij = sum_p g_o(p) x_i(p) x_j(p)`` (symmetric in i, j).

    Args:
        in_channels: C_in.
        out_channels: C_out (default C_in).
        impl: 'sym' or 'full'.
        legacy_transpose: reproduce the reference CIFAR layer's layout bug: the term added at
            (h, w) is the one computed at (w, h) (square maps only).
        ablation: 'none', or 'cov' to remove the covariance term tr(Q Sigma). With mu the spatial
            mean of x over the map (per sample and channel) and d(p) = x(p) - mu, the exact identity
            ``x^T Q x = mu^T Q mu + 2 mu^T Q_sym d + d^T Q d`` holds at every pixel, and the spatial
            mean of the last term is tr(Q Sigma) (Sigma the spatial covariance of x). 'cov' drops
            ``d^T Q d``: ``q_o(p) = mu^T Q_o mu + d(p)^T (Q_o + Q_o^T) mu``, whose spatial mean is
            ``E[x^T Q x] - tr(Q Sigma)``; the term keeps the mean's quadratic part and becomes
            linear in the pixel's deviation from it.

    Input [N, C_in, H, W], output [N, C_out, H, W]. The products are computed channels-last
    ([N*H*W, C] rows; free when x is in channels_last memory format).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, impl: str = "sym",
                 legacy_transpose: bool = False, ablation: str = "none"):
        super().__init__()
        out_channels = out_channels or in_channels
        if in_channels < 1 or out_channels < 1:
            raise BionetsError(f"QuadraticChannel needs at least one channel, got in={in_channels} out={out_channels}")
        if impl not in IMPLS:
            raise unknown("quadratic impl", impl, IMPLS)
        if ablation not in ABLATIONS:
            raise unknown("quadratic ablation", ablation, ABLATIONS)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.impl, self.legacy_transpose, self.ablation = impl, legacy_transpose, ablation
        self.enabled = True
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise BionetsError(f"QuadraticChannel expects {self.in_channels} input channels, got {c} (input {list(x.shape)})")
        if not self.enabled:
            return x.new_zeros(n, self.out_channels, h, w)
        if self.ablation == "cov":
            out = _without_covariance(x, self.weight)
        else:
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            out = channel_quadratic(rows, self.weight, self.impl).view(n, h, w, -1).permute(0, 3, 1, 2)
        if self.legacy_transpose:
            if h != w:
                raise BionetsError(f"legacy_transpose needs square maps (the reference's layout bug), got {h}x{w}")
            out = out.transpose(2, 3)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, impl={self.impl}, "
                f"legacy_transpose={self.legacy_transpose}, ablation={self.ablation}")


def _without_covariance(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``mu^T Q_o mu + (x(p) - mu)^T (Q_o + Q_o^T) mu``: x^T Q x without d^T Q d (ablation 'cov')."""
    mu = x.mean(dim=(2, 3))                                           # [N, C]
    const = torch.einsum("ni,oij,nj->no", mu, q, mu)                  # mu^T Q_o mu
    lin = torch.einsum("oij,nj->noi", q + q.transpose(1, 2), mu)      # (Q_o + Q_o^T) mu
    return const[:, :, None, None] + torch.einsum("noi,nihw->nohw", lin, x - mu[:, :, None, None])


# How the symmetric form is computed. 'rows' (CPU): exactly the C(C+1)/2 pairs i <= j, in the
# row-major order of ``torch.triu_indices``, one small matmul per triangle row i with the products
# ``x_i * x[i:]`` (they stay in cache). 'blocks' (GPU without Triton, or wider than 'fused' goes):
# the channels in b blocks of width w; for every block pair I <= J the outer product of x_I and x_J
# (one broadcast multiply for all pairs, no per-product gather or atomic add), then one matmul;
# the lower triangle of a diagonal block is formed with zero weight, so C^2 (b+1)/(2b) products. b = 2 for even C >= 64 (3/4 of C^2:
# 6,912 at C = 96), else b = 1: measured on an H100 (bf16, C = 96, 56x56, batch 64), eager
# PyTorch's batched products run fastest with blocks this wide (16.7 ms per training step of the
# layer against 22.7 ms at w = 12, C(C+1)/2-close, and 38 ms for all C^2 products with the
# reference's saved outer product). Both strategies save only x and S and recompute the products
# in backward.


# 'fused' (GPU, the default where Triton is installed, for C <= FUSED_MAX_CHANNELS): the products
# formed inside Triton matmul kernels, never stored, as outer products of 8-channel blocks
# (:mod:`bionets.layers.quadratic_triton`). On an H200 (bf16, channels_last; benchmarks/RESULTS.md)
# it took Dit-ConvNeXt-T's step from 1.42x to 1.13x its twin's eager and to 1.20x under CUDA graphs
# (1.55x with 'blocks'), and Dit-ResNet-20's to 1.22x eager (1.26x) and 1.03-1.06x under graphs
# (1.11x). Wider layers keep 'blocks' until measured: the kernels unroll a loop over the C / 8 blocks.
FUSED_MAX_CHANNELS = 128
_CUDA_STRATEGY = "auto"
CUDA_STRATEGIES = ("auto", "blocks", "fused")


def set_cuda_strategy(name: str) -> None:
    """How the sym form runs on CUDA from now on: 'auto' (default: 'fused' where Triton is installed,
    builds its kernels on the GPU and C <= :data:`FUSED_MAX_CHANNELS`, else 'blocks'), 'blocks'
    (PyTorch's batched products) or 'fused' (Triton kernels)."""
    global _CUDA_STRATEGY
    if name not in CUDA_STRATEGIES:
        raise unknown("CUDA quadratic strategy", name, CUDA_STRATEGIES)
    if name == "fused" and _triton_kernels() is None:
        raise BionetsError("the 'fused' quadratic strategy needs Triton (pip install triton), which is not installed")
    _CUDA_STRATEGY = name


def _cuda_strategy(c: int, device: torch.device) -> str:
    """The strategy of the sym form for C input channels on a CUDA device (:func:`set_cuda_strategy`)."""
    if _CUDA_STRATEGY != "auto":
        return _CUDA_STRATEGY
    if c > FUSED_MAX_CHANNELS or _triton_kernels() is None:
        return "blocks"
    if torch.compiler.is_compiling():
        return "fused"              # Inductor needs Triton on the GPU too; nothing to try first
    return "fused" if _fused_works(device) else "blocks"


_FUSED_WORKS: dict[str, bool] = {}


def _fused_works(device: torch.device) -> bool:
    """Whether Triton builds and runs the 'fused' kernels on ``device``: tried once per device on a
    tiny layer, forward and backward. If not, one warning, and 'auto' picks 'blocks' there from then on."""
    key = str(device)
    if key not in _FUSED_WORKS:
        def attempt() -> bool:
            with torch.inference_mode(False), torch.enable_grad():     # whatever mode the caller is in
                # fixed values, not random ones: the try leaves the caller's random stream alone
                x = torch.linspace(-1, 1, 36, device=device).view(4, 9).requires_grad_()
                q = torch.linspace(-1, 1, 162, device=device).view(2, 9, 9).requires_grad_()
                channel_quadratic(x, q, strategy="fused").sum().backward()
            return True
        _FUSED_WORKS[key] = run_or_warn(attempt, f"the quadratic layer's Triton kernels cannot run on {key}",
                                        "it uses its 'blocks' strategy there instead (correct, slower)")[1] is None
    return _FUSED_WORKS[key]


def _triton_kernels():
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


def _indices(c: int, strategy: str, device: torch.device) -> tuple[torch.Tensor, ...]:
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
    i, j = torch.triu_indices(c, c)
    pair = torch.empty(c, c, dtype=torch.long)
    pair[i, j] = pair[j, i] = torch.arange(i.numel())
    return pair.to(device), (1 + torch.eye(c)).to(device)


def channel_quadratic(rows: torch.Tensor, q: torch.Tensor, impl: str = "sym", strategy: str | None = None) -> torch.Tensor:
    """``q_o = sum_ij Q[o,i,j] x_i x_j`` for every row x of ``rows`` [M, C]: [M, C_out].

    ``strategy`` ('rows', 'blocks' or 'fused'; default by device: see above) only matters for ``impl='sym'``."""
    m, c = rows.shape
    if impl == "full":
        # all C^2 products (the reference's batched outer product): [M, C*C] @ [C*C, C_out]
        return (rows.unsqueeze(2) * rows.unsqueeze(1)).reshape(m, c * c) @ q.reshape(q.shape[0], c * c).t()
    dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) else rows.dtype
    rows = rows.to(dtype)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # one gather + one matmul: a small graph whose batch size stays dynamic
        i, j = _indices(c, "rows", rows.device)
        return (rows[:, i] * rows[:, j]) @ fold_symmetric(q, i, j).to(dtype)
    strategy = strategy or (_cuda_strategy(c, rows.device) if rows.is_cuda else "rows")
    if strategy == "fused":
        s = _triton_kernels().fold(q).to(dtype)
    else:
        i, j = _indices(c, strategy, rows.device)[:2]
        s = fold_symmetric(q, i, j).to(dtype)
    if torch.compiler.is_compiling() and (strategy == "fused" or not rows.is_cuda):
        return sym_quadratic_op(rows, s, strategy)          # opaque to Inductor: our kernels run inside
    if torch.is_grad_enabled() and (rows.requires_grad or s.requires_grad):
        return _SymmetricQuadratic.apply(rows, s, strategy)
    return _sym_forward(rows, s, strategy)


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


def _sym_forward(rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
    """``sum_{(i,j)} S_ij x_i x_j`` over the strategy's products, chunk by chunk of rows."""
    m, c = rows.shape
    if strategy == "fused":
        return _triton_kernels().forward(rows, s)
    out = rows.new_empty(m, s.shape[1])
    if strategy == "blocks":
        w, (bi, bj) = _block_width(c), _indices(c, "blocks", rows.device)[2:]
        for r in _chunks(rows, s.shape[0]):
            torch.mm(_block_products(rows[r], w, bi, bj), s, out=out[r])
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


def _sym_backward(rows: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, strategy: str, want_x: bool,
                  want_s: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx, dL/dS) of :func:`_sym_forward`, recomputing the products chunk by chunk instead of
    saving them: ``dL/dS_ij = sum g x_i x_j``; ``dL/dx = sum_o g_o T_o x`` with T_o = Q_o + Q_o^T.
    Each is None where not wanted."""
    c = rows.shape[1]
    grad = grad.to(rows.dtype)
    if strategy == "fused":
        return _triton_kernels().backward(rows, s, grad, want_x, want_s)
    grad_s = torch.zeros(s.shape, dtype=torch.promote_types(s.dtype, torch.float32), device=s.device) if want_s else None
    if strategy == "rows":
        if want_s:
            _rows_grad_s(rows, grad, s, out=grad_s)
        grad_x = _rows_grad_x(rows, grad, s) if want_x else None
    else:
        grad_x = torch.zeros_like(rows) if want_x else None
        w, (bi, bj) = _block_width(c), _indices(c, "blocks", rows.device)[2:]
        for r in _chunks(rows, s.shape[0]):
            x, g = rows[r], grad[r]
            if want_s:
                grad_s += (_block_products(x, w, bi, bj).t() @ g).to(grad_s.dtype)
            if want_x:
                grad_x[r] = _block_grad_x(x, g @ s.t(), w, bi, bj)    # g @ S^T: dL/d(x_I[u] x_J[v])
    return grad_x, (grad_s.to(s.dtype) if want_s else None)


class _SymmetricQuadratic(torch.autograd.Function):
    """:func:`_sym_forward` with :func:`_sym_backward` (the products recomputed, not saved)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
        ctx.save_for_backward(rows, s)
        ctx.strategy = strategy
        return _sym_forward(rows, s, strategy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, s = ctx.saved_tensors
        return *_sym_backward(rows, s, grad, ctx.strategy, *ctx.needs_input_grad[:2]), None


# Inside a compiled model the sym form is one opaque operator, run by the kernels above, on the CPU
# (traced, its chunk loops unrolled into a graph that took ~45 s to compile for Dit-ResNet-20 on 2
# CPU cores and ran slower than these kernels) and with the 'fused' strategy (Triton kernels, also
# inside CUDA graphs). CUDA's 'blocks' strategy is traced: Inductor's kernels for it were measured
# faster under CUDA graphs than the eager ones.

@torch.library.custom_op("bionets::sym_quadratic", mutates_args=())
def sym_quadratic_op(rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
    """``sum_{(i,j)} S_ij x_i x_j`` for every row (:func:`_sym_forward`) as a torch operator."""
    return _sym_forward(rows, s, strategy)


@sym_quadratic_op.register_fake
def _(rows: torch.Tensor, s: torch.Tensor, strategy: str) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], s.shape[1])


@torch.library.custom_op("bionets::sym_quadratic_backward", mutates_args=())
def sym_quadratic_backward_op(rows: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, strategy: str, want_x: bool,
                              want_s: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sym_backward` as a torch operator; a gradient not wanted comes back empty."""
    grad_x, grad_s = _sym_backward(rows, s, grad, strategy, want_x, want_s)
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


def quadratic_terms(model: nn.Module) -> dict[str, QuadraticTerm]:
    """Every quadratic term of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuadraticTerm)}


def set_quadratic(model: nn.Module, enabled: bool, names: list[str] | None = None) -> list[str]:
    """Switch quadratic terms off (``enabled=False``) or back on, e.g. in a trained model at inference
    (the paper's per-block ablation). ``names``: blocks or terms (``'layer2.0'``,
    ``'stages.0.blocks.2'`` or the term's own module name); ``None`` for all. Returns the names of
    the terms switched. An unknown name raises :class:`BionetsError` listing the valid ones."""
    terms = quadratic_terms(model)
    if not terms:
        raise BionetsError(f"{type(model).__name__} has no quadratic term to switch")
    chosen = list(terms) if names is None else []
    for name in names or []:
        hits = [t for t in terms if t == name or t.startswith(name + ".")]
        if not hits:
            blocks = {t.rsplit(".", 1)[0] for t in terms}
            raise unknown("quadratic block", name, sorted(blocks | set(terms)))
        chosen += [t for t in hits if t not in chosen]
    for name in chosen:
        terms[name].enabled = enabled
    return chosen
