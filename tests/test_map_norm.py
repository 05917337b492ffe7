"""MapLayerNorm (LayerNorm over a map's [H, W]) through its C++ kernels for channels_last float32 maps,
against the direct formula in float64, and PyTorch's LayerNorm everywhere else."""
import pytest
import torch
from torch import nn

import bionets.layers.cpu_kernels as cpu_kernels
import bionets.layers.map_norm as map_norm
from bionets.errors import BionetsError
from bionets.layers.map_norm import MapLayerNorm
from compile_helpers import own_cpu_kernels


@pytest.fixture
def needs_kernels():
    own_cpu_kernels("map_norm_cpu")


def _randomized(size) -> MapLayerNorm:
    norm = MapLayerNorm(size)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def _grads(norm, x, g):
    out = norm(x)
    return (out, *torch.autograd.grad(out, (x, norm.weight, norm.bias), g))


def _direct(x, w, b, eps=1e-5):
    """The formula of the module docstring, written out."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


# channel counts below, at and past a channel group of vector registers, with tails; square and not
@pytest.mark.usefixtures("needs_kernels")
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (4, 32, 16, 16), (2, 16, 7, 9), (2, 70, 5, 5), (1, 130, 3, 8), (5, 2, 1, 6)])
def test_kernels_match_formula_float64(shape):
    """Output and the three gradients within float32 rounding of the float64 formula (relative error
    < 1e-5 of each tensor's norm); output and input gradient stay channels_last."""
    torch.manual_seed(0)
    norm = _randomized(shape[2:])
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert map_norm._takes(x, norm.weight, norm.bias)
    g = torch.randn(shape)
    got = _grads(norm, x, g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias))
    out64 = _direct(x64, w64, b64)
    want = (out64, *torch.autograd.grad(out64, (x64, w64, b64), g.double()))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5
    assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
    assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("needs_kernels")
def test_kernels_give_the_same_result_on_any_number_of_threads():
    """dL/dw and dL/db sum one part per (sample, channel group) in a fixed order."""
    torch.manual_seed(0)
    norm = _randomized((8, 8))
    x = torch.randn(6, 40, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(6, 40, 8, 8)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(norm, x, g))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def test_is_torch_layernorm_elsewhere(monkeypatch):
    """NCHW maps, float64 and switched-off kernels get PyTorch's LayerNorm exactly; the gradient of a
    channels_last map may arrive NCHW; the state dict is nn.LayerNorm's."""
    torch.manual_seed(0)
    norm = _randomized((5, 7))
    ref = nn.LayerNorm([5, 7])
    ref.load_state_dict(norm.state_dict())
    assert set(norm.state_dict()) == {"weight", "bias"} and norm.normalized_shape == (5, 7)
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    assert not map_norm._takes(x, norm.weight, norm.bias)
    assert not map_norm._takes(x.double(), norm.weight, norm.bias)
    g = torch.randn(3, 6, 5, 7)
    assert all(torch.equal(a, b) for a, b in zip(_grads(norm, x, g), _grads(ref, x, g)))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    want = _grads(ref, x_cl, g)
    torch.testing.assert_close(_grads(norm, x_cl, g), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("BIONETS_CPU_KERNELS", "0")
    assert all(torch.equal(a, b) for a, b in zip(_grads(norm, x_cl, g), want))


@pytest.mark.usefixtures("needs_kernels")
def test_float32_under_cpu_autocast():
    """Under CPU bf16 autocast a bf16 channels_last map is normalized by the kernels in float32 and
    comes back float32 (CUDA autocast's policy for LayerNorm), with its gradient in bf16."""
    torch.manual_seed(0)
    norm = _randomized((4, 6))
    x = torch.randn(3, 10, 4, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.layer_norm(x.detach().float(), (4, 6), norm.weight, norm.bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def test_a_map_of_another_size_is_refused_in_any_layout():
    """A channels_last 9x1 map has the 3x3 norm's nine positions: the kernels must not take it (they
    normalized it with the 3x3 weights); the norm names the shape it takes, as for NCHW (a 4x3 map of
    a (3, 4) norm raised a raw RuntimeError), and for a map that is not [N, C, H, W]."""
    norm = _randomized((3, 3))
    for shape in ((2, 4, 9, 1), (2, 4, 1, 9), (2, 4, 4, 4)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).contiguous(memory_format=fmt)
            assert not map_norm._takes(x, norm.weight, norm.bias)
            with pytest.raises(BionetsError, match=rf"MapLayerNorm\(3, 3\) takes \[N, C, 3, 3\] maps, got shape \{list(shape)}"):
                norm(x)
    with pytest.raises(BionetsError, match=r"takes \[N, C, 3, 4\] maps, got shape \[2, 5, 4, 3\]"):
        MapLayerNorm((3, 4))(torch.randn(2, 5, 4, 3))
    with pytest.raises(BionetsError, match=r"got shape \[4, 3, 3\]"):
        norm(torch.randn(4, 3, 3))
    with pytest.raises(BionetsError, match="takes floating-point input, got torch.int64"):
        norm(torch.ones(2, 4, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("map_size,eps,message", [
    (5, 1e-5, r"map_size=\(height, width\), got 5"),                     # (TypeError: cannot unpack)
    ((3,), 1e-5, r"map_size=\(height, width\), got \(3,\)"),             # (ValueError)
    ((3, 4, 5), 1e-5, r"got \(3, 4, 5\)"),
    ((3, 2.5), 1e-5, "positive whole numbers, got width=2.5"),
    ((3, 3), -1, "eps must be a positive number .*got -1"),                # (NaN everywhere, silently)
    ((3, 3), 0, "got 0"),
    ((3, 3), "1e-5", "got '1e-5'"),
    ((3, 3), float("nan"), "got nan"),
])
def test_map_size_and_eps_are_checked(map_size, eps, message):
    with pytest.raises(BionetsError, match=message):
        MapLayerNorm(map_size, eps=eps)


def test_a_map_of_another_dtype_than_the_weights(monkeypatch):
    """The weights go to the map's dtype, as in the quadratic terms (a float64 map raised 'mixed dtype
    (CPU)' in either layout); a bf16 map keeps float32 weights (PyTorch's CPU LayerNorm takes them);
    float32 channels_last maps keep the C++ kernels whatever the weights' dtype."""
    torch.manual_seed(0)
    norm = _randomized((3, 4))
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt)
        out = norm(xf)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, _direct(xf, norm.weight.double(), norm.bias.double()), rtol=1e-12, atol=1e-12)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb), _direct(xb.double(), norm.weight.double(), norm.bias.double()).bfloat16())
    calls = []
    monkeypatch.setattr(map_norm._MapNormCpu, "apply", lambda *a: calls.append(a) or a[0])
    norm.double()(x.float().contiguous(memory_format=torch.channels_last))
    assert (len(calls) == 1) == (cpu_kernels.ops("map_norm_cpu") is not None)
    assert all(t.dtype == torch.float32 for t in calls[0][:3]) if calls else True
