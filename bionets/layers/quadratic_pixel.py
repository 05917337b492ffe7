"""The pixel-wise quadratic term the Dit-CNN paper compares against, after QuadraLib.

QuadraLib (Xu et al., MLSys 2022) builds a quadratic convolution from two (three) convolutions::

    y = BN(W_a * x) . BN(W_b * x) + BN(W_c * x)

``(W_a * x)(p) (W_b * x)(p) = sum_{u,v} W_a[u] W_b[v] x(p+u) x(p+v)`` is a (rank-1 per output channel)
quadratic form over the positions of the k x k window: the products are between pixels, not between
the channels of one pixel as in Dit-CNN's channel-wise term (:class:`QuadraticChannel`). QuadraNet
(Xu et al., 2023) uses the same form with depthwise 7x7 convolutions (``groups=C``), which is how the
pixel-wise Dit-ConvNeXt rows use it.
"""
from __future__ import annotations

import torch
from torch import nn

from bionets.errors import BionetsError, require_bools, require_sizes
from bionets.layers.amp import autocast_casts
from bionets.layers.quadratic import QuadraticTerm


class QuadraticPixel(QuadraticTerm):
    """``BN(W_a * x) . BN(W_b * x) [+ BN(W_c * x)]`` with k x k convolutions (QuadraLib's form).

    Args:
        in_channels, out_channels: channels (out defaults to in).
        kernel_size: k (3 in QuadraLib, 7 depthwise in QuadraNet); 'same' padding, stride 1.
        groups: 1 for full convolutions, ``in_channels`` for depthwise ones.
        linear: add QuadraLib's linear branch ``BN(W_c * x)``. The Dit blocks use ``linear=False``:
            the block's own convolution is the linear part and only the product term is added
            (``dwconv(x) + BN(W_a * x) . BN(W_b * x)``), as the channel-wise term is.

    Initialization: the convolutions as :class:`torch.nn.Conv2d`; the scale of ``BN_b`` is zero, so
    that the product term starts at zero (a Dit network starts as its plain twin, as with the
    zero-initialized Q of the channel-wise term) while its gradient is not zero.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int = 3,
                 groups: int = 1, linear: bool = True):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        require_sizes("QuadraticPixel", in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                      groups=groups)
        require_bools("QuadraticPixel", linear=linear)
        if kernel_size % 2 == 0:
            raise BionetsError(f"QuadraticPixel kernel_size must be odd and >= 1 ('same' padding), got {kernel_size}")
        if in_channels % groups or out_channels % groups:
            raise BionetsError(f"QuadraticPixel groups={groups} must divide in_channels={in_channels} "
                               f"and out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.enabled = True

        def conv_bn() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                           groups=groups, bias=False), nn.BatchNorm2d(out_channels))

        self.branch_a, self.branch_b = conv_bn(), conv_bn()
        self.branch_c = conv_bn() if linear else None
        nn.init.zeros_(self.branch_b[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output in x's dtype, as QuadraticChannel's. An x of another dtype than the weights' (outside
        autocast, which casts for the convolutions itself) is computed in the weights' dtype: the
        BatchNorms' running statistics must stay in theirs. An empty map gives an empty output."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise BionetsError(f"QuadraticPixel expects [N, {self.in_channels}, H, W] maps, got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise BionetsError(f"QuadraticPixel takes floating-point input, got {x.dtype}: convert it (x.float())")
        n, _, h, w = x.shape
        if h * w == 0:          # (the convolutions refuse a 0 x 0 map; the zeros stay in x's graph for backward)
            return x.new_zeros(n, self.out_channels, h, w) + x.sum() * 0
        dtype = self.branch_a[0].weight.dtype
        if x.dtype != dtype and not autocast_casts(x, dtype):
            return self._terms(x.to(dtype)).to(x.dtype)
        return self._terms(x)

    def _terms(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            y = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        else:
            y = self.branch_a(x) * self.branch_b(x)
        return y if self.branch_c is None else y + self.branch_c(x)
