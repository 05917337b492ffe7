"""ARR's class-mean update as one Triton kernel, for CUDA tensors.

On a GPU, a ResNet-20 or ViT-Tiny step at CIFAR sizes is bound by the host's kernel launches, and
ARR's update written in PyTorch ops (:func:`bionets.layers.arr.sequential_means`, some 70 small
operators) added 17-26% to the step on an H200. This kernel replays the reference code's loop
instead, in batch order, with each class's mean held in registers::

    for each sample i (class k = y_i):
        before_i = m_k                          (r_i where class k has no mean yet: its first response)
        m_k      = (1 - a) before_i + a r_i
        after_i  = m_k

One program takes one hooked layer j and ``BLOCK_D`` features of every class: a [K, BLOCK_D] tile of
means that each sample reads and writes through a one-hot row mask, so no step waits on memory
written by the step before. The tile holds at least 16 features of every class, so up to 1024
classes at any width (:func:`fits`; 1000 classes not yet timed); more classes take the PyTorch
path. Math in float32.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernel on CPU tensors (the tests
do this in a subprocess).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bionets.layers.triton_kernels import launch_device

MAX_TILE = 16384            # K_pad * BLOCK_D: 128 float32 registers a thread at 4 warps


@triton.jit
def _arr_scan_kernel(r_ptr, y_ptr, mean_ptr, seen_ptr, out_ptr, seen_out_ptr, N, K, D, momentum,
                     AFTER: tl.constexpr, UPDATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    classes = tl.arange(0, BLOCK_K)
    tile_offs = (j * K + classes)[:, None].to(tl.int64) * D + cols[None, :]
    tile_mask = (classes < K)[:, None] & (cols < D)[None, :]
    means = tl.load(mean_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    known = tl.load(seen_ptr + j * K + classes, mask=classes < K, other=0) != 0
    row = j.to(tl.int64) * N * D
    for i in range(N):
        k = tl.load(y_ptr + i)
        r = tl.load(r_ptr + row + i * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        hit = classes == k
        m = tl.sum(tl.where(hit[:, None], means, 0.0), axis=0)
        had = tl.max(tl.where(hit & known, 1, 0), axis=0) > 0
        before = tl.where(had, m, r)                      # a class's first response starts its mean
        after = tl.where(had, (1 - momentum) * m + momentum * r, r)
        means = tl.where(hit[:, None], after[None, :], means)
        known = known | hit
        tl.store(out_ptr + row + i * D + cols, after if AFTER else before, mask=cols < D)
    if UPDATE:
        tl.store(mean_ptr + tile_offs, means, mask=tile_mask)
        if tl.program_id(1) == 0:        # (into a copy: the other feature blocks may still read seen)
            tl.store(seen_out_ptr + j * K + classes, known.to(tl.uint8), mask=classes < K)


def fits(classes: int, dim: int) -> bool:
    """Whether a [K, D] memory runs here: at least 16 features of every class in one program's tile."""
    return triton.next_power_of_2(classes) * 16 <= MAX_TILE and dim > 0


def class_means(mean: torch.Tensor, seen: torch.Tensor, r: torch.Tensor, y: torch.Tensor, momentum: float, *,
                after: bool, update: bool) -> torch.Tensor:
    """Each sample's class mean right ``after`` (else right before) its own update, [J, N, D] float32,
    for ``r`` [J, N, D] and classes ``y`` [N]; with ``update``, ``mean`` [J', K, D] float32 and
    ``seen`` [J', K] uint8 (J' >= J: the first J layers) take the batch's updates in place."""
    layers, n, dim = r.shape
    classes = mean.shape[1]
    r, y = r.float().contiguous(), y.contiguous()
    out = torch.empty_like(r)
    seen_out = torch.empty((layers, classes), dtype=seen.dtype, device=seen.device) if update else out
    block_k = triton.next_power_of_2(classes)
    block_d = max(16, min(triton.next_power_of_2(dim), MAX_TILE // block_k))
    with launch_device(r):
        _arr_scan_kernel[(layers, triton.cdiv(dim, block_d))](
            r, y, mean, seen, out, seen_out, n, classes, dim, momentum,
            AFTER=after, UPDATE=update, BLOCK_K=block_k, BLOCK_D=block_d)
    if update:
        seen[:layers] = seen_out
    return out
