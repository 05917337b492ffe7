"""Aggregated Response Regularization (ARR) of DNRT (Qiu et al., ICLR 2024).

A biological neuron's aggregated response is specific to the category it sees. ARR keeps, per
class k and hooked layer j, a running mean m_{j,k} of the aggregated responses r_j (the pooled
features that feed the classifier of a CNN; the class token after every block of a ViT), and
pulls every training sample's responses towards its class's mean::

    m_k <- (1 - momentum) * m_k + momentum * r        (per sample, in batch order; the first
                                                        response of a class initializes m_k)
    L_ARR = weight * (1/J) * sum_j mean_elements |r_j - m_{j,y}|      (m detached)

``form='paper'`` compares each sample with its class's mean just before the sample's own update
(mu^{t-1}, the paper's equation: the means after the batch's earlier samples of that class);
``form='code'`` with the mean just after it (mu^t, the reference code). Both are vectorized: the
sequential update over a class's samples r_1..r_n is ``m_i = (1-a)^i m_0 + sum_{l<=i} a (1-a)^(i-l)
r_l``, computed as a matrix product. The memory lives in buffers (saved in checkpoints); under DDP
the responses of every process are gathered in the order of the global batch (process r holds its
positions r, r + W, r + 2W, ..., as the samplers deal them), so every process applies the update one
process would apply to the whole batch.

In one process, the loss is one operator of ARR's own where it is built (:func:`_own_operator`: the
scan in C++ on the CPU, in CUDA C++ on the GPU, and the loss with its autograd in C++:
``arr_autograd.h``): on a GPU the eager step of a CIFAR-sized model waits on the host, and the loss
through PyTorch's operators cost ~0.6 ms of host time a step. Elsewhere on CUDA one Triton kernel
computes the update (:mod:`bionets.layers.arr_triton`), else the PyTorch operators do.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from bionets.errors import BionetsError, is_real, require_sizes, whole
from bionets.layers import cpu_kernels, cuda_kernels
from bionets.layers.kernel_fallback import failed_on, overload_callable, plain_call, run_or_fall_back, under_torch_func
from bionets.layers.triton_kernels import triton_kernels

FORMS = ("paper", "code")
CUDA_MAX_CLASSES = 6144     # arr_cuda.cu: every class's mean of one feature and its first sample in 48 KB of shared memory
_OWN_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


class ArrMemory(nn.Module):
    """Class means of J hooked layers: ``mean`` [J, K, D] and ``seen`` [J, K] buffers. State of
    training only (``training_only``): exports leave it out, and ``model.init`` into a model without
    ARR ignores it."""

    training_only = True

    def __init__(self, layers: int, classes: int, dim: int):
        super().__init__()
        require_sizes("ArrMemory", layers=layers, classes=classes, dim=dim)
        self.register_buffer("mean", torch.zeros(layers, classes, dim))
        self.register_buffer("seen", torch.zeros(layers, classes, dtype=torch.uint8))  # uint8: DDP broadcasts it

    def _apply(self, fn, recurse=True):
        """``model.half()`` / ``.bfloat16()`` leave the class means in float32: a running mean of
        momentum 0.1 in bf16 stops moving once an update is below its 8-bit mantissa's step."""
        super()._apply(fn, recurse)
        if self.mean.dtype in (torch.float16, torch.bfloat16):
            self.mean = self.mean.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: the memory holds state only, so a model that runs its children in turn
        (an ``nn.Sequential`` that ARR added it to) passes through it unchanged."""
        return x

    def extra_repr(self) -> str:
        j, k, d = self.mean.shape
        return f"layers={j}, classes={k}, dim={d}"


def sequential_means(m0: torch.Tensor, r: torch.Tensor, y: torch.Tensor, momentum: float, *,
                     each: str | None = "after", rows: slice = slice(None)) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-sample EMA means in batch order, as small matrix products.

    m0 [..., K, D] the means before the batch, r [..., N, D] responses, y [N] classes (leading
    dimensions: one per hooked layer). Returns (each sample's class mean [..., N, D] right ``'after'``
    or right ``'before'`` its own update, or None with ``each=None``, for the samples ``rows``
    only; final [..., K, D]). With p_i
    the 1-based position of sample i among its class's samples in the batch and n_k the class's
    count, unrolling the sequential update gives::

        after_i  = (1-a)^p_i     m0[y_i] + sum_{l <= i, y_l = y_i} a (1-a)^(p_i - p_l) r_l
        before_i = (1-a)^(p_i-1) m0[y_i] + sum_{l < i,  y_l = y_i} a (1-a)^(p_i - 1 - p_l) r_l
        final_k  = (1-a)^n_k     m0[k]   + sum_{y_l = k}           a (1-a)^(n_k - p_l) r_l

    Every factor is at most 1 (no float64 needed), nothing is sorted, and nothing waits for the GPU
    (no boolean-mask indexing, no tensor made from a Python number on the device).
    """
    a, decay = momentum, 1 - momentum
    onehot = (torch.arange(m0.shape[-2], device=y.device)[:, None] == y).to(r.dtype)   # [K, N]
    count = onehot.sum(1)                                                               # n_k
    pos = onehot.cumsum(1).gather(0, y[None, :]).squeeze(0)                             # p_i
    last_weights = onehot * (a * torch.pow(decay, count[y] - pos))   # row k: a (1-a)^(n_k - p_l) on class k's samples
    final = torch.pow(decay, count)[:, None] * m0 + (last_weights @ r).to(m0.dtype)
    if each is None:
        return None, final
    lag = 0 if each == "after" else 1
    i = torch.arange(len(y), device=y.device)[rows]                         # the samples asked for
    upto = (y[i, None] == y[None, :]) & (torch.arange(len(y), device=y.device) <= i[:, None] - lag)   # l <= i / l < i
    weights = torch.where(upto, a * torch.pow(decay, pos[i, None] - lag - pos[None, :]), 0.0)
    means = torch.pow(decay, pos[i] - lag)[:, None] * m0.index_select(-2, y[i]) + weights.to(r.dtype) @ r
    return means.to(r.dtype), final


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_across_ranks(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every DDP process's ``t`` along ``dim`` in the global batch's order: process r's i-th entry at
    position i W + r (the samplers deal the batch so); ``t`` itself when not distributed."""
    rank, size = world()
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts, dim + 1).flatten(dim, dim + 1)


def per_sample(r: torch.Tensor, n: int) -> torch.Tensor:
    """Responses [k n, D] of a net that folds k time steps into the batch (a spiking net's [T, N, ...]
    as [T N, ...], time outer, SpikingJelly's layout) averaged over time: [n, D], each sample's
    firing rate; ``r`` itself when it has n rows, none (an empty batch: the mean of no time steps
    was NaN), or a row count that is no multiple of n (arr_loss then names the counts). ``n`` is
    ``len(targets)``, 0 for an empty batch. Integer or bool rows (spike counts) average in float32:
    torch's mean takes no integers."""
    if not isinstance(r, torch.Tensor) or not r.ndim or whole(n) is None or n < 0:
        raise BionetsError(f"per_sample takes responses as a tensor [T N, ...] and n, the number of samples, as a whole "
                           f"number >= 0, got {_what(r)} and n={n!r}")
    rows = r.shape[0]
    if rows == n or n == 0 or rows == 0 or rows % n:
        return r
    exact = r.is_floating_point() or r.is_complex()
    return r.view(rows // n, n, *r.shape[1:]).mean(0, dtype=None if exact else torch.float32)


def _what(value) -> str:
    """What a user passed, for a message: a tensor's or array's shape and dtype, else its type
    (a list's or tuple's items by theirs)."""
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of [{', '.join(_what(v) for v in value[:4])}{', ...' if len(value) > 4 else ''}]"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    shape, name = getattr(value, "shape", None), type(value).__name__.replace("ndarray", "numpy array")
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}" + (f" of shape {shape}" if isinstance(shape, tuple) else "")


def _scan_on_gpu(memory: ArrMemory, r: torch.Tensor, y: torch.Tensor, momentum: float, form: str,
                 update: bool) -> torch.Tensor | None:
    """The class means of every sample by the Triton kernel (:mod:`bionets.layers.arr_triton`, one
    launch where the PyTorch path takes some 70: on a GPU the step is bound by launches), updating
    ``memory``; None where it does not run: off CUDA, while compiling (Inductor fuses the PyTorch
    path), for a memory too large for its tile, or where Triton cannot build it (one warning)."""
    mean, seen = memory.mean, memory.seen
    if not r.is_cuda or torch.compiler.is_compiling() or mean.dtype != torch.float32 or not mean.is_contiguous():
        return None
    kernels = triton_kernels("arr_triton")
    if kernels is None or not kernels.fits(mean.shape[1], mean.shape[2]) or failed_on("arr", r.device):
        return None
    return run_or_fall_back("arr", r.device, lambda: kernels.class_means(mean, seen, r, y, momentum,
                                                                         after=form == "code", update=update),
                            "ARR's Triton kernel cannot run", "ARR uses its PyTorch operators")


def _own_operator(memory: ArrMemory, responses: list[torch.Tensor] | torch.Tensor, targets: torch.Tensor):
    """ARR's own operators (``arr_cpu.cpp``, or ``arr_cuda.cu`` where nvcc builds it: the class-mean
    scan and the loss in one call, autograd in C++) where they compute this loss, else None: in one
    process (DDP gathers the responses first), outside compiling, tracing and torch.func, for a
    non-empty batch on the memory's device (CPU or CUDA; on CUDA at most 6144 classes)."""
    mean = memory.mean
    devices = {responses.device} if isinstance(responses, torch.Tensor) else {t.device for t in responses}
    if (mean.dtype != torch.float32 or not mean.is_contiguous() or not len(targets) or targets.device != mean.device
            or not devices <= {mean.device} or world()[1] > 1):
        return None
    if plain_call():
        return None
    if mean.is_cuda:       # (at most 65535 blocks of features, one feature a block at the most classes)
        fits = mean.shape[1] <= CUDA_MAX_CLASSES and mean.shape[2] <= 65535
        return cuda_kernels.ops("arr_cuda") if fits else None
    return cpu_kernels.ops("arr_cpu") if mean.device.type == "cpu" else None


class _ClassTokens(torch.autograd.Function):
    """Token 0 of J token tensors [N, T, D], stacked: [J, N, D]. The backward writes the J gradients
    into one zero buffer [J, N, T, D] and hands its views out (one fill and one copy for all J); J
    slices ``x[:, 0]`` stacked took a fill and a copy each (``select_backward``) and J autograd nodes.
    Autograd then adds each view to its block's other gradient into a new tensor (a slice's own
    gradient it could add into in place): one addition a block either way."""

    @staticmethod
    def forward(ctx, *blocks):
        ctx.shape, ctx.dtype = (len(blocks), *blocks[0].shape), blocks[0].dtype
        return torch.stack([x[:, 0] for x in blocks])

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        full[:, :, 0] = grad
        return full.unbind(0)


def class_tokens(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack([x[:, 0] for x in blocks])``, the class tokens after J transformer blocks as
    [J, N, D] (arr_loss takes it as it is), with a backward of two kernels for all J blocks instead
    of two each, and J autograd nodes fewer: on a GPU the eager step of a small ViT waits on the
    host. Its cost: the J blocks' gradients [N, T, D] live in one buffer until the backward has
    passed the first block, where the plain slices' were freed one at a time. Plain slices where
    the blocks differ in shape, dtype or device, or under torch.compile, tracing or torch.func."""
    if (not isinstance(blocks, (list, tuple)) or not blocks
            or not all(isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] for x in blocks)):
        raise BionetsError(f"class_tokens takes a non-empty list of block outputs [N, T, D] with T >= 1 tokens (a "
                           f"single block: [x]), got {_what(blocks)}")
    first = blocks[0]
    alike = all(x.shape == first.shape and x.dtype == first.dtype and x.device == first.device for x in blocks)
    if not alike and any(x.shape[0] != first.shape[0] or x.shape[2] != first.shape[2] or x.device != first.device
                         for x in blocks):      # (checked only where they differ: this runs every step)
        raise BionetsError(f"class_tokens: blocks of shapes {[tuple(x.shape) for x in blocks]} on "
                           f"{sorted({str(x.device) for x in blocks})}: every block needs the same N samples and D "
                           "features, on one device")
    plain = not alike or plain_call()
    return torch.stack([x[:, 0] for x in blocks]) if plain else _ClassTokens.apply(*blocks)


def _stacked(responses: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """[J, N, D]: the responses in their dtype where they share one the kernels read, else in float32."""
    if isinstance(responses, torch.Tensor):
        return responses if responses.dtype in _OWN_DTYPES[responses.device.type] else responses.float()
    if len({t.dtype for t in responses}) > 1 or responses[0].dtype not in _OWN_DTYPES[responses[0].device.type]:
        responses = [t.float() for t in responses]
    return responses[0].unsqueeze(0) if len(responses) == 1 else torch.stack(responses)


def _not_floating(responses) -> BionetsError:
    # (complex ones were cast to their real part with a warning only; integers failed in the kernels)
    return BionetsError(f"arr_loss takes floating-point responses, got {_what(responses)} (integer ones: r.float(); "
                        "complex ones: r.real or r.abs())")


def arr_loss(memory: ArrMemory, responses: list[torch.Tensor] | torch.Tensor, targets: torch.Tensor, *,
             weight: float, momentum: float, form: str = "paper", update: bool = True) -> torch.Tensor:
    """The ARR term for a batch of responses (one [N, D] tensor per hooked layer, or all of them as
    one [J, N, D] tensor, as :func:`class_tokens` gives them; all layers at once); updates ``memory``."""
    # plain Python checks (ArrConfig's bounds): no tensor is read back from the device every step; each
    # cheap where it passes (on a GPU the eager step of a small model waits on the host)
    if (form not in FORMS or not (type(momentum) is float or is_real(momentum)) or not 0 <= momentum < 1
            or not (type(weight) is float or is_real(weight)) or not 0 <= weight < math.inf):
        raise BionetsError(f"arr_loss needs form in {FORMS}, momentum a number in [0, 1) and weight a finite number "
                           f">= 0, got form={form!r}, momentum={momentum!r}, weight={weight!r}")
    weight, momentum = float(weight), float(momentum)        # numpy's too, for the kernels and the PyTorch path
    if (not isinstance(targets, torch.Tensor) or targets.ndim != 1 or targets.is_floating_point() or targets.is_complex()
            or targets.dtype == torch.bool):          # bool targets read as classes 0 and 1
        raise BionetsError(f"arr_loss takes targets as a 1-D integer tensor of class indices, got {_what(targets)} "
                           "(one-hot targets: targets.argmax(1))")
    mean = memory.mean
    layers, classes, dim = mean.shape
    n = targets.shape[0]
    as_one = isinstance(responses, torch.Tensor)
    if as_one:
        if not responses.dtype.is_floating_point:
            raise _not_floating(responses)
        if responses.ndim == 2:
            raise BionetsError(f"arr_loss: one tensor of shape {tuple(responses.shape)} for a memory of {layers} "
                               f"layer(s) of {dim} features: one layer's [N, D] responses go in a list, [r] (or all "
                               "layers as one [J, N, D] tensor)")
        shapes = [tuple(responses.shape[1:])] * len(responses) if responses.ndim == 3 else [tuple(responses.shape)]
    else:
        if not (isinstance(responses, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in responses)):
            raise BionetsError(f"arr_loss takes responses as torch tensors (a list of [N, D], one a layer, or one "
                               f"[J, N, D] tensor), got {_what(responses)}")
        if not all(t.dtype.is_floating_point for t in responses):
            raise _not_floating(responses)
        shapes = [tuple(t.shape) for t in responses]
    if not shapes or len(shapes) > layers or (as_one and responses.ndim != 3) \
            or any(len(s) != 2 or s[1] != dim for s in shapes):
        got = f"one tensor of shape {tuple(responses.shape)}" if as_one else f"responses of shapes {shapes}"
        raise BionetsError(f"arr_loss: {got} for a memory of {layers} layer(s) of {dim} features: give 1 to {layers} "
                           f"[N, {dim}] tensors, or one [J, N, {dim}] tensor with J <= {layers}")
    if any(s[0] != n for s in shapes):
        raise BionetsError(f"arr_loss: {[s[0] for s in shapes]} responses for {n} targets: one row "
                           "per sample is needed (per_sample() averages a spiking net's time steps)")
    if targets.is_cpu and n:
        low, high = torch.aminmax(targets)
        if not 0 <= int(low) <= int(high) < classes:
            raise BionetsError(f"arr_loss: a target outside 0..{classes - 1} (the memory's classes)")
    if update and under_torch_func():
        raise BionetsError("arr_loss under a torch.func transform (grad, vmap, ...) cannot update the class memory, a "
                           "buffer the transform does not own: call it with update=False there (ARR's hook: in eval "
                           "mode it adds no loss) and update the memory outside the transform")
    if (own := _own_operator(memory, responses, targets)) is not None:
        return overload_callable(own.arr_loss.default)(_stacked(responses), targets, mean, memory.seen, momentum,
                                                       weight, form == "code", update)
    if targets.dtype not in (torch.int32, torch.int64):        # scatter and gather index by int32/int64 only
        targets = targets.long()
    # in the memory's precision at least: float32 for half ones (see ArrMemory), float64 for a double model
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in ([responses] if as_one else responses)],
                             memory.mean.dtype)
    r = responses.to(dtype) if as_one else torch.stack([t.to(dtype) for t in responses])      # [J, N, D]
    with torch.no_grad():
        all_r, all_y = gather_across_ranks(r.detach(), dim=1), gather_across_ranks(targets)
        n = len(all_y)
    if n == 0:                                  # an empty batch on every rank: no class to pull towards
        return r.sum() * 0.0
    rank, size = world()
    with torch.no_grad():
        target_means = _scan_on_gpu(memory, all_r, all_y, momentum, form, update)
        if target_means is not None:
            target_means = target_means[:, rank::size]                   # this process's samples
        else:
            first = torch.full((memory.mean.shape[1],), n, dtype=torch.long, device=all_y.device)
            first.scatter_reduce_(0, all_y, torch.arange(n, device=all_y.device), "amin")   # each class's first sample
            new = (memory.seen[:len(r)] == 0) & (first < n)              # classes this batch shows for the first time
            m0 = torch.where(new[..., None], all_r.index_select(1, first.clamp_max(n - 1)), memory.mean[:len(r)])
            target_means, final = sequential_means(m0, all_r, all_y, momentum, rows=slice(rank, None, size),
                                                   each="before" if form == "paper" else "after")
            if form == "code":     # a new class's first sample is its own mean: (1-a) r + a r rounds off r, and
                i = torch.arange(n, device=all_y.device)[rank::size]     # |r - t| took a full gradient's sign of that
                own_first = new[:, all_y[i]] & (first[all_y[i]] == i)[None]               # [J, this rank's N]
                target_means = torch.where(own_first[..., None], all_r[:, i], target_means)
            if update:
                memory.mean[:len(r)] = final
                memory.seen[:len(r)] |= new.to(torch.uint8)
    if r.shape[1] == 0:                         # this rank's batch is empty (the others updated the means)
        return r.sum() * 0.0
    return weight * (r - target_means).abs().mean()
