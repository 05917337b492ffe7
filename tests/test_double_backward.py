"""Second derivatives through the layers with hand-written backwards (gradient penalties, MAML,
Hessian-vector products): under ``create_graph=True`` each differentiates its plain expression, so
the fused kernels' first-derivative-only backwards never stand in for it. Checked against autograd
of the direct float64 formula, in the layouts that take the C++ kernels (float32, channels_last)
and the PyTorch paths."""
import copy

import pytest
import torch

from bionets.layers.map_norm import MapLayerNorm
from bionets.layers.quadratic import QuadraticChannel, channel_quadratic
from bionets.layers.raa import RAA
from test_raa import direct as raa_direct, randomized


def _second_order(fn, x, params):
    """d/d(x, params) of |d/dx sum(fn(x)^2)|^2: a gradient penalty's gradient."""
    g, = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(g.square().sum(), (x, *params))


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(module, x, formula):
    """The module's second-order gradients (float32, or float64 on the PyTorch path) against the
    formula's in float64 on a float64 copy of the module."""
    got = _second_order(module, x.detach().requires_grad_(), list(module.parameters()))
    ref = copy.deepcopy(module).double()
    ref_params = list(ref.parameters())
    want = _second_order(lambda t: formula(ref, t), x.detach().double().requires_grad_(), ref_params)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-10
    assert all(_rel(a, b) < tol for a, b in zip(got, want)), [_rel(a, b) for a, b in zip(got, want)]


@pytest.mark.parametrize("variant,base", [("vector", "gelu"), ("vector", "relu"), ("scalar", "gelu"), ("matrix", "gelu")])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "float64"])
def test_raa(variant, base, layout):
    torch.manual_seed(0)
    raa = randomized(RAA(8, variant, base))
    x = torch.randn(2, 8, 4, 5)
    x = {"channels_last": x.contiguous(memory_format=torch.channels_last), "nchw": x, "float64": x.double()}[layout]
    _compare(raa.double() if layout == "float64" else raa, x, lambda m, t: raa_direct(t, m, 1))


def _quadratic_formula(layer, t):
    n, c, h, w = t.shape
    rows = t.permute(0, 2, 3, 1).reshape(-1, c)
    return torch.einsum("oij,mi,mj->mo", layer.weight, rows, rows).view(n, h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "float64"])
def test_quadratic_channel(layout):
    torch.manual_seed(0)
    layer = QuadraticChannel(6, 4)
    with torch.no_grad():
        layer.weight.normal_(std=0.3)
    x = torch.randn(2, 6, 3, 4)
    x = {"channels_last": x.contiguous(memory_format=torch.channels_last), "nchw": x, "float64": x.double()}[layout]
    _compare(layer.double() if layout == "float64" else layer, x, _quadratic_formula)


def test_quadratic_blocks_strategy():
    """The GPU's 'blocks' layout of S (run here on the CPU), through its own (i, j) pairs."""
    torch.manual_seed(0)
    x = torch.randn(20, 64, dtype=torch.float64, requires_grad=True)       # C = 64: two blocks
    q = (0.1 * torch.randn(3, 64, 64, dtype=torch.float64)).requires_grad_()
    got = _second_order(lambda t: channel_quadratic(t, q, strategy="blocks"), x, [q])
    want = _second_order(lambda t: torch.einsum("oij,mi,mj->mo", q, t, t), x, [q])
    assert all(_rel(a, b) < 1e-10 for a, b in zip(got, want))


def test_fused_strategy_pairs_name_the_rows_of_its_weight():
    """The 'fused' (Triton) layout's (i, j) pairs, used for its second derivatives: with them,
    (x_i x_j) @ fold(Q) is x^T Q x, padded channels included (C = 13 is not a multiple of 8)."""
    triton_module = pytest.importorskip("bionets.layers.quadratic_triton")
    torch.manual_seed(0)
    x, q = torch.randn(5, 13, dtype=torch.float64), torch.randn(2, 13, 13, dtype=torch.float64)
    i, j = triton_module.pairs(13)
    got = (x[:, i] * x[:, j]) @ triton_module.fold(q)
    assert _rel(got, torch.einsum("oij,mi,mj->mo", q, x, x)) < 1e-12


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_map_layernorm(layout):
    torch.manual_seed(0)
    norm = MapLayerNorm((4, 5))
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = 2 * torch.randn(2, 6, 4, 5) + 1
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    _compare(norm, x, lambda m, t: torch.nn.functional.layer_norm(t, (4, 5), m.weight, m.bias, m.eps))
