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

import math

import torch
from torch import nn

from bionets.errors import BionetsError, name_list, require_bools, require_module, require_sizes, unknown
from bionets.layers import cpu_kernels
from bionets.layers.amp import autocast_casts
from bionets.layers.kernel_fallback import run_or_warn, under_function_transform
from bionets.layers.quadratic_sym import (SymmetricQuadratic, fold_symmetric, indices, sym_forward, sym_quadratic_op,
                                          triton_module)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a quadratic term computes in for input ``x``: autocast's where it is on for x's
    device (it leaves float64 alone), else x's own. Weights of another dtype are cast to it."""
    return torch.get_autocast_dtype(x.device.type) if autocast_casts(x) else x.dtype


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
        require_sizes("QuadraticNeuron", in_features=in_features, out_features=out_features,
                      **({} if rank is None else {"rank": rank}))
        require_bools("QuadraticNeuron", bias=bias)
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
        """``x^T A_o x`` for every row of x [N, in] and neuron o: [N, out] (A in x's dtype)."""
        n, d = x.shape
        if self.rank is None:
            # (x A_o)_j = sum_i x_i A_oij for every o at once, then dot with x.
            xa = (x @ self.A_full.to(x.dtype).permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, d)
            return (xa * x.unsqueeze(1).to(xa.dtype)).sum(-1)   # (under autocast xa is in its dtype; x is not)
        xu = (x @ self.U.to(x.dtype).permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, self.rank)
        xv = (x @ self.V.to(x.dtype).permute(1, 0, 2).reshape(d, -1)).view(n, self.out_features, self.rank)
        return (xu * xv).sum(-1)   # sum_r (x.U_or)(x.V_or)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise BionetsError(f"QuadraticNeuron expects input [N, {self.in_features}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise BionetsError(f"QuadraticNeuron takes floating-point input, got {x.dtype}: convert it (x.float())")
        w, b = self.linear.weight, self.linear.bias
        if w.dtype == x.dtype:
            return self.linear(x) + self.quadratic(x)
        # weights in x's dtype, as QuadraticChannel's (a float64 x met float32 weights in a raw matmul error)
        return nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)) + self.quadratic(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class QuadraticTerm(nn.Module):
    """Base of the quadratic terms added to a convolutional block (channel-wise and pixel-wise).

    ``enabled = False`` switches the quadratic product off (the output of a term without a linear
    branch becomes zero; a pixel-wise term built with ``linear=True`` keeps its ``BN(W_c * x)``): the
    paper's per-block inference ablation that removes ``x^T A x`` from a trained network (see
    :func:`set_quadratic`).
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
    ``x_i x_j (i <= j)`` (on CPU exactly these, half the multiply-adds of ``impl='full'``, without
    saving them for backward). On GPU the strategy depends on C (:func:`set_cuda_strategy`): eagerly,
    for C <= 64, all C^2 products by one batched product, saved for backward ('outer': more
    multiply-adds than the spec's symmetric form, but fewer kernel launches, which bound a small eager
    step); otherwise, and in compiled models, the products of 8-channel block pairs I <= J inside Triton
    matmul kernels ('fused'), or without Triton those of two channel blocks, 3/4 of C^2 ('blocks').
    ``impl='full'`` forms all C^2 products (the reference's batched outer product, kept as the slow
    reference). Both give Q the same gradient,
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
        out_channels = in_channels if out_channels is None else out_channels
        require_sizes("QuadraticChannel", in_channels=in_channels, out_channels=out_channels)
        require_bools("QuadraticChannel", legacy_transpose=legacy_transpose)
        if impl not in IMPLS:
            raise unknown("quadratic impl", str(impl), IMPLS)
        if ablation not in ABLATIONS:
            raise unknown("quadratic ablation", str(ablation), ABLATIONS)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.impl, self.legacy_transpose, self.ablation = impl, legacy_transpose, ablation
        self.enabled = True
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            hint = {3: " (a single image: x.unsqueeze(0))",
                    5: " (a sequence [T, N, C, H, W]: fold its time steps into the batch, x.flatten(0, 1))"}
            raise BionetsError(f"QuadraticChannel takes [N, C, H, W] maps, got shape {list(x.shape)}"
                               + hint.get(x.ndim, ""))
        n, c, h, w = x.shape
        if not x.is_floating_point():           # (integer maps gave zeros silently)
            raise BionetsError(f"QuadraticChannel takes floating-point input, got {x.dtype}: convert it (x.float())")
        if c != self.in_channels:
            raise BionetsError(f"QuadraticChannel expects {self.in_channels} input channels, got {c} (input {list(x.shape)})")
        if not self.enabled:
            return x.new_zeros(n, self.out_channels, h, w)
        if self.ablation == "cov":
            out = _without_covariance(x, self.weight)
        else:
            if x.is_cuda and self.impl == "sym" and autocast_casts(x):
                # one copy to the products' dtype and the rows' layout (channels_last), where two would follow
                x = x.to(torch.get_autocast_dtype("cuda"), memory_format=torch.channels_last)
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            out = channel_quadratic(rows, self.weight, self.impl).view(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        if self.legacy_transpose:
            if h != w:
                raise BionetsError(f"legacy_transpose needs square maps (the reference's layout bug), got {h}x{w}")
            out = out.transpose(2, 3)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, impl={self.impl}, "
                f"legacy_transpose={self.legacy_transpose}, ablation={self.ablation}")


def _without_covariance(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``mu^T Q_o mu + (x(p) - mu)^T (Q_o + Q_o^T) mu``: x^T Q x without d^T Q d (ablation 'cov').
    Q in x's dtype (autocast's matmuls take it from there), as in the sym form."""
    q = q.to(x.dtype)
    mu = x.mean(dim=(2, 3))                                           # [N, C]
    const = torch.einsum("ni,oij,nj->no", mu, q, mu)                  # mu^T Q_o mu
    lin = torch.einsum("oij,nj->noi", q + q.transpose(1, 2), mu)      # (Q_o + Q_o^T) mu
    return const[:, :, None, None] + torch.einsum("noi,nihw->nohw", lin, x - mu[:, :, None, None])


# 'fused' (GPU, for C <= FUSED_MAX_CHANNELS where Triton is installed: the default of compiled
# models, and of eager ones above OUTER_MAX_CHANNELS): the products formed inside Triton matmul
# kernels, never stored, as outer products of 8-channel blocks (:mod:`bionets.layers.quadratic_triton`).
# On an H200 (bf16, channels_last; benchmarks/RESULTS.md) it took Dit-ConvNeXt-T's step from 1.42x to
# 1.13x its twin's eager and to 1.20x under CUDA graphs (1.55x with 'blocks'), and Dit-ResNet-20's to
# 1.22x eager (1.26x) and 1.03-1.06x under graphs (1.11x). Wider layers keep 'blocks' until measured:
# the kernels unroll a loop over the C / 8 blocks.
# 'outer' (GPU, the eager default for C <= OUTER_MAX_CHANNELS): all C^2 products, as one batched
# product, and one matmul with Q; autograd's own backward. Twice the sym form's products, but some
# 11 kernel launches forward and backward where 'fused' took ~40 and Python around them: an eager
# Dit-ResNet-20 step on an H200 waits on the host, and it went from 1.25-1.32x its twin's with
# 'fused' to 1.12-1.16x. It saves the [M, C^2] products (C times the map: 64 MB for Dit-ResNet-20's
# layer at batch 128), so wider layers, and maps whose products would pass OUTER_MAX_BYTES (an
# ImageNet ResNet's 64 channels at 56x56, batch 128: 3.3 GB), keep 'fused'.
FUSED_MAX_CHANNELS = 128
OUTER_MAX_CHANNELS = 64
OUTER_MAX_BYTES = 256 * 2**20
_CUDA_STRATEGY = "auto"
CUDA_STRATEGIES = ("auto", "blocks", "fused", "gather", "outer")


def set_cuda_strategy(name: str) -> None:
    """How the sym form runs on CUDA from now on: 'auto' (default: eager, 'outer' for C <=
    :data:`OUTER_MAX_CHANNELS` where the products take at most :data:`OUTER_MAX_BYTES`; else 'fused'
    where Triton is installed, builds its kernels on the GPU and C <= :data:`FUSED_MAX_CHANNELS`;
    else 'blocks'), 'blocks' (PyTorch's batched products), 'fused' (Triton kernels), 'outer' (all
    C^2 products by one batched product, one matmul, autograd's backward: few launches, for eager
    steps bound by the host; it saves the products) or 'gather' (the C(C+1)/2 products gathered and
    multiplied, one matmul, autograd's backward; it saves the products and both gathered factors,
    and its dL/dx adds with atomics on CUDA, so it is not bitwise reproducible there)."""
    global _CUDA_STRATEGY
    if name not in CUDA_STRATEGIES:
        raise unknown("CUDA quadratic strategy", name, CUDA_STRATEGIES)
    if name == "fused" and triton_module() is None:
        raise BionetsError("the 'fused' quadratic strategy needs Triton (pip install triton), which is not installed")
    _CUDA_STRATEGY = name


def _cuda_strategy(c: int, device: torch.device, products_bytes: int = 0) -> str:
    """The strategy of the sym form for C input channels on a CUDA device (:func:`set_cuda_strategy`),
    for a call whose C^2 products would take ``products_bytes``."""
    if _CUDA_STRATEGY != "auto":
        return _CUDA_STRATEGY
    if c <= OUTER_MAX_CHANNELS and products_bytes <= OUTER_MAX_BYTES and not torch.compiler.is_compiling():
        return "outer"
    if c > FUSED_MAX_CHANNELS or triton_module() is None:
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


def channel_quadratic(rows: torch.Tensor, q: torch.Tensor, impl: str = "sym", strategy: str | None = None) -> torch.Tensor:
    """``q_o = sum_ij Q[o,i,j] x_i x_j`` for every row x of ``rows`` [M, C]: [M, C_out].

    ``strategy`` ('rows', 'blocks', 'fused', 'gather' or 'outer'; default by device: :func:`set_cuda_strategy`, and
    the comments of :mod:`bionets.layers.quadratic_sym`) only matters for ``impl='sym'``."""
    m, c = rows.shape
    if rows.stride(-1) != 1:        # one channel: [M, 1] rows can be dense with any column stride; the kernels want 1
        rows = rows.clone(memory_format=torch.contiguous_format)
    if impl == "full":
        # all C^2 products (the reference's batched outer product): [M, C*C] @ [C*C, C_out], Q in
        # the rows' dtype (autocast's matmul casts both on to its own), as in the sym form
        return (rows.unsqueeze(2) * rows.unsqueeze(1)).reshape(m, c * c) @ q.reshape(q.shape[0], c * c).to(rows.dtype).t()
    device = rows.device.type
    dtype = compute_dtype(rows)
    plain = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or under_function_transform()
    strategy = strategy or (_cuda_strategy(c, rows.device, m * c * c * dtype.itemsize) if rows.is_cuda and not plain
                            else None)
    if strategy == "outer":
        # all C^2 products x_i x_j as one batched product [M, C, 1] @ [M, 1, C], then one matmul
        # with Q: its gradient is the same sum_p g_o x_i x_j, symmetric in i, j, as the folded form's
        rows = rows.to(dtype)
        return (rows.unsqueeze(2) @ rows.unsqueeze(1)).flatten(1) @ q.reshape(q.shape[0], c * c).to(dtype).t()
    if strategy == "gather" or plain:
        # the plain expression, one gather per factor + one matmul, which autograd differentiates
        # itself: the 'gather' strategy, and a small graph whose batch size stays dynamic for the
        # tracers and exporters (plain ops, which torch.func transforms handle)
        rows = rows.to(dtype)
        i, j = indices(c, "rows", rows.device)
        return (rows.index_select(1, i) * rows.index_select(1, j)) @ fold_symmetric(_wide(q, dtype), i, j).to(dtype)
    if dtype in (torch.bfloat16, torch.float16) and device == "cpu":
        # bf16/fp16 on the CPU: x in float32 (element-wise products in bf16 are slow on the CPU:
        # Dit-ResNet-20's layer under bf16 autocast took 2x as long). With the C++ kernels, for bf16 the
        # products rounded to bf16 for bf16 matmuls (float32 accumulation); else all in float32, rounded
        # once (the PyTorch path's per-triangle-row sums in bf16 had ~10x the kernels' error)
        with torch.autocast("cpu", enabled=False):
            if dtype == torch.bfloat16 and strategy in (None, "rows") and cpu_kernels.ops("quadratic_cpu") is not None:
                return _channel_quadratic_sym(rows.float().contiguous(), q.float(), strategy, s_dtype=dtype)
            return _channel_quadratic_sym(rows.float(), q.float(), strategy).to(dtype)
    return _channel_quadratic_sym(rows.to(dtype), q, strategy)


def _wide(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q in the wider of its dtype and ``dtype``, to fold it in (float32 weights of a float64 map were
    folded, Q_ij + Q_ji, in float32)."""
    return q.to(torch.promote_types(q.dtype, dtype))


def _channel_quadratic_sym(rows: torch.Tensor, q: torch.Tensor, strategy: str | None,
                           s_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sym form of :func:`channel_quadratic` in ``rows``' dtype (or, on the CPU, in ``s_dtype``:
    bf16 products and matmuls from float32 rows), by strategy and mode."""
    c, dtype = rows.shape[1], s_dtype or rows.dtype
    strategy = strategy or "rows"
    if strategy == "fused":
        s = triton_module().fold(q).to(dtype)
    else:
        i, j = indices(c, strategy, rows.device)[:2]
        s = fold_symmetric(_wide(q, dtype), i, j).to(dtype)
    if torch.compiler.is_compiling() and (strategy == "fused" or not rows.is_cuda):
        return sym_quadratic_op(rows, s, strategy)          # opaque to Inductor: our kernels run inside
    if torch.is_grad_enabled() and (rows.requires_grad or s.requires_grad):
        return SymmetricQuadratic.apply(rows, s, strategy)
    return sym_forward(rows, s, strategy)


def rename_reference_weight(key: str, value: torch.Tensor, old: str, new: str) -> tuple[str, torch.Tensor]:
    """A checkpoint entry of the Dit-CNN reference code whose key ends in ``old`` (its quadratic
    weight, stored flat as [C_out, C_in * C_in]) as ``new`` [C_out, C_in, C_in], Q's layout here
    (``Q[o, i, j]`` the weight of ``x_i x_j``, entry ``i * C_in + j`` of the flat row); any other
    entry as it is."""
    if not key.endswith(old):
        return key, value
    c_in = math.isqrt(value.shape[1])
    return key[:-len(old)] + new, value.reshape(-1, c_in, c_in)


def quadratic_terms(model: nn.Module) -> dict[str, QuadraticTerm]:
    """Every quadratic term of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuadraticTerm)}


def set_quadratic(model: nn.Module, enabled: bool, names: list[str] | None = None) -> list[str]:
    """Switch quadratic terms off (``enabled=False``) or back on, e.g. in a trained model at inference
    (the paper's per-block ablation). ``names``: blocks or terms (``'layer2.0'``,
    ``'stages.0.blocks.2'`` or the term's own module name); ``None`` for all. Returns the names of
    the terms switched. An unknown name raises :class:`BionetsError` listing the valid ones.
    ``enabled`` must be a bool ('false' is truthy) and ``names`` a list (a string was read a character
    at a time)."""
    require_module(model, "set_quadratic")
    if not isinstance(enabled, bool):
        raise BionetsError(f"set_quadratic takes enabled=True or False, got {enabled!r}")
    if names is not None:
        names = name_list(names, "set_quadratic(names=...)")
        bad = [name for name in names if not isinstance(name, str)]
        if bad:
            raise BionetsError(f"set_quadratic(names=...) takes block or term names (strings), got {bad[0]!r}")
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
