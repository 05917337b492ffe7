"""The quadratic layers of Dit-CNN against their equations computed directly in float64."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bionets.errors import BionetsError
from bionets.layers.quadratic import (ABLATIONS, IMPLS, QuadraticChannel, QuadraticNeuron, channel_quadratic,
                                      set_quadratic)
from bionets.layers.quadratic_pixel import QuadraticPixel
from compile_helpers import assert_compiled_matches_eager, needs_cpu_compiler, own_cpu_kernels


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def channel_formula(x, q):
    """q_o(p) = sum_{i,j} Q[o,i,j] x_i(p) x_j(p), every pair (i, j) summed."""
    return torch.einsum("oij,nihw,njhw->nohw", q, x, x)


def random_channel(c_in, c_out=None, **kw):
    layer = QuadraticChannel(c_in, c_out, **kw).double()
    with torch.no_grad():
        layer.weight.normal_()
    return layer


# ---------------------------------------------------------------- QuadraticNeuron

@pytest.mark.parametrize("rank", [None, 2])
def test_neuron_matches_formula(rank):
    torch.manual_seed(0)
    neuron = QuadraticNeuron(6, 3, rank=rank).double()
    with torch.no_grad():
        (neuron.A_full if rank is None else neuron.V).normal_()
    x = torch.randn(20, 6, dtype=torch.float64)
    a = neuron.A
    # A from the raw parameters (rank r: A_o = sum_r U_or V_or^T), not from the layer's own A
    raw = neuron.A_full if rank is None else torch.einsum("oir,ojr->oij", neuron.U, neuron.V)
    expected = x @ neuron.linear.weight.t() + neuron.linear.bias + torch.einsum("ni,oij,nj->no", x, raw, x)
    assert rel_err(neuron(x), expected) < 1e-12
    assert rel_err(neuron.float()(x.float()).double(), expected) < 1e-5
    assert a.shape == (3, 6, 6)
    assert neuron.extra_params == (3 * 36 if rank is None else 2 * 3 * 6 * 2)
    if rank is not None:
        assert torch.linalg.matrix_rank(a[0]).item() <= rank


@pytest.mark.parametrize("rank", [None, 2])
def test_neuron_starts_linear_and_gradchecks(rank):
    torch.manual_seed(0)
    neuron = QuadraticNeuron(4, 2, rank=rank).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.equal(neuron.A, torch.zeros(2, 4, 4, dtype=torch.float64))
    assert torch.allclose(neuron(x), neuron.linear(x))
    neuron(x).sum().backward()   # A = 0, yet the quadratic part receives a gradient
    grad = neuron.A_full.grad if rank is None else neuron.V.grad
    assert grad.abs().sum() > 0
    with torch.no_grad():
        (neuron.A_full if rank is None else neuron.V).normal_()
    assert torch.autograd.gradcheck(neuron, (x,))


@pytest.mark.parametrize("rank", [None, 2])
def test_neuron_under_bf16_autocast_gives_bf16_near_float32(rank):
    """Under CPU bf16 autocast both forms give bf16, as nn.Linear does (the full form gave float32:
    its product met the float32 input), within bf16's rounding of the float32 output."""
    torch.manual_seed(0)
    neuron, x = QuadraticNeuron(5, 3, rank=rank), torch.randn(4, 5)
    with torch.no_grad():
        for p in neuron.parameters():
            p.normal_(0, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = neuron(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), neuron(x), rtol=0.05, atol=0.05)


def test_neuron_rejects_bad_rank_and_input():
    with pytest.raises(BionetsError, match="rank=5"):
        QuadraticNeuron(4, 2, rank=5)
    with pytest.raises(BionetsError, match=r"\[N, 4\]"):
        QuadraticNeuron(4, 2)(torch.randn(3, 5))
    with pytest.raises(BionetsError, match="takes floating-point input, got torch.int64"):
        QuadraticNeuron(4, 2)(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(BionetsError, match="True or False for bias='no'"):
        QuadraticNeuron(4, 2, bias="no")


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_neuron_takes_input_of_another_dtype_than_its_weights(rank, w_dtype, x_dtype):
    """Weights cast to x's dtype, as QuadraticChannel's (a float64 x raised 'mat1 and mat2 must have the
    same dtype'); output in x's dtype, gradients in the weights'."""
    torch.manual_seed(0)
    neuron = QuadraticNeuron(3, 2, rank=rank)
    with torch.no_grad():
        (neuron.A_full if rank is None else neuron.V).normal_()
    neuron = neuron.to(w_dtype)
    x = torch.randn(5, 3, dtype=torch.float64)
    want = QuadraticNeuron(3, 2, rank=rank).double()
    want.load_state_dict(neuron.state_dict())
    out = neuron(x.to(x_dtype))
    assert out.dtype == x_dtype and rel_err(out.double(), want(x)) < 1e-5
    out.sum().backward()
    assert all(p.grad.dtype == w_dtype for p in neuron.parameters())


# ---------------------------------------------------------------- QuadraticChannel

@pytest.mark.parametrize("impl", ["sym", "full"])
@pytest.mark.parametrize("shape,c_out", [((2, 5, 4, 3), 5), ((3, 4, 5, 5), 7), ((2, 3, 50, 48), 2)])
def test_channel_matches_formula(impl, shape, c_out):
    """Relative error < 1e-6 in float64 and < 1e-4 in float32; the last shape spans several row chunks."""
    torch.manual_seed(0)
    layer = random_channel(shape[1], c_out, impl=impl)
    x = torch.randn(*shape, dtype=torch.float64)
    expected = channel_formula(x, layer.weight)
    assert rel_err(layer(x), expected) < 1e-6
    with torch.no_grad():
        assert rel_err(layer(x), expected) < 1e-6
        assert rel_err(layer.float()(x.float()).double(), expected) < 1e-4


@pytest.mark.parametrize("strategy", ["rows", "blocks", "gather", "outer"])
@pytest.mark.parametrize("c,c_out,m", [(1, 2, 5), (7, 3, 9), (12, 5, 4100), (32, 32, 2100), (40, 4, 50),
                                       (64, 3, 6), (72, 2, 30)])
def test_the_strategies_match_the_formula_and_gradcheck(strategy, c, c_out, m):
    """'rows' (CPU default), 'blocks' (GPU without Triton), 'gather' and 'outer' (plain expressions
    with autograd's backward; 'outer' the GPU's eager default for C <= 64) checked on CPU; 4,100 rows span two chunks, C = 64 gives
    'blocks' two channel blocks. C = 32, 40 and 72 take each of the CPU backward's
    layouts (see _PRODUCTS_BY_COLUMN_MAX_C); 2,100 rows of 32 x 32 span two outer-product chunks."""
    torch.manual_seed(0)
    x = torch.randn(m, c, dtype=torch.float64, requires_grad=True)
    q = torch.randn(c_out, c, c, dtype=torch.float64, requires_grad=True)
    out = channel_quadratic(x, q, strategy=strategy)
    assert rel_err(out, torch.einsum("oij,mi,mj->mo", q, x, x)) < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, q), g)
    want = torch.autograd.grad(channel_quadratic(x, q, impl="full"), (x, q), g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(got, want))
    if m < 100 and c < 20:
        assert torch.autograd.gradcheck(lambda x, q: channel_quadratic(x, q, strategy=strategy), (x, q))


def test_channel_is_zero_initialized_and_counts_parameters():
    layer = QuadraticChannel(32)
    assert layer.weight.shape == (32, 32, 32) and layer.weight.abs().sum() == 0
    assert layer.extra_params == 32 ** 3
    assert layer(torch.randn(2, 32, 4, 4)).abs().sum() == 0


@pytest.mark.parametrize("impl,ablation", [("sym", "none"), ("full", "none"), ("sym", "cov")])
def test_channel_gradcheck(impl, ablation):
    torch.manual_seed(0)
    layer = random_channel(3, 2, impl=impl, ablation=ablation)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    q = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, q: torch.func.functional_call(layer, {"weight": q}, (x,)), (x, q))


def test_sym_and_full_give_q_the_same_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    grads = {}
    for impl in ("sym", "full"):
        torch.manual_seed(1)
        layer = random_channel(6, 4, impl=impl)
        xi = x.clone().requires_grad_()
        (layer(xi) * torch.linspace(-1, 1, 100, dtype=torch.float64).view(1, 1, 10, 10)[..., :5, :5]).sum().backward()
        grads[impl] = layer.weight.grad, xi.grad
    assert rel_err(grads["sym"][0], grads["full"][0]) < 1e-12
    assert rel_err(grads["sym"][1], grads["full"][1]) < 1e-12
    q = grads["sym"][0]
    assert torch.allclose(q, q.transpose(1, 2))   # only the symmetric part of Q matters


def test_legacy_transpose_swaps_height_and_width():
    torch.manual_seed(0)
    layer = random_channel(4)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    correct = layer(x)
    layer.legacy_transpose = True
    assert torch.equal(layer(x), correct.transpose(2, 3))
    with pytest.raises(BionetsError, match="square"):
        layer(torch.randn(1, 4, 5, 6, dtype=torch.float64))


def test_covariance_ablation_removes_exactly_the_fluctuation_term():
    """'cov': x^T Q x - d^T Q d with d = x - spatial mean; its spatial mean is mu^T Q mu."""
    torch.manual_seed(0)
    layer = random_channel(5, 3, ablation="cov")
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64) + 1.0
    d = x - x.mean((2, 3), keepdim=True)
    out = layer(x)
    assert rel_err(out, channel_formula(x, layer.weight) - channel_formula(d, layer.weight)) < 1e-12
    mu = x.mean((2, 3))
    assert torch.allclose(out.mean((2, 3)), torch.einsum("ni,oij,nj->no", mu, layer.weight, mu))
    full_mean = channel_formula(x, layer.weight).mean((2, 3))
    sigma = torch.einsum("nihw,njhw->nij", d, d) / 42
    trace = torch.einsum("oij,nji->no", layer.weight, sigma)       # tr(Q Sigma)
    assert torch.allclose(full_mean - out.mean((2, 3)), trace)


def test_channel_switch_and_bad_options():
    layer = random_channel(3)
    layer.enabled = False
    assert layer(torch.randn(2, 3, 4, 4, dtype=torch.float64)).abs().sum() == 0
    with pytest.raises(BionetsError, match="impl 'fast'"):
        QuadraticChannel(3, impl="fast")
    with pytest.raises(BionetsError, match="ablation 'trace'"):
        QuadraticChannel(3, ablation="trace")
    with pytest.raises(BionetsError, match="3 input channels, got 4"):
        QuadraticChannel(3)(torch.randn(1, 4, 2, 2))
    with pytest.raises(BionetsError, match=r"takes \[N, C, H, W\] maps, got shape \[3, 4, 4\] \(a single image"):
        QuadraticChannel(3)(torch.randn(3, 4, 4))
    with pytest.raises(BionetsError, match=r"shape \[2, 1, 3, 4, 4\] \(a sequence \[T, N, C, H, W\]: fold its time "):
        QuadraticChannel(3)(torch.randn(2, 1, 3, 4, 4))
    with pytest.raises(BionetsError, match="takes floating-point input, got torch.int64"):
        QuadraticChannel(3)(torch.ones(1, 3, 2, 2, dtype=torch.long))    # (zeros, silently)
    with pytest.raises(BionetsError, match="True or False for legacy_transpose='no'"):
        QuadraticChannel(3, legacy_transpose="no")                       # (truthy: transposed, silently)
    with pytest.raises(BionetsError, match="unknown quadratic impl 'None'"):
        QuadraticChannel(3, impl=None)


@pytest.mark.parametrize("w_dtype,x_dtype,tol", [(torch.float64, torch.float32, 1e-5),
                                                 (torch.float32, torch.float64, 1e-12),
                                                 (torch.float32, torch.bfloat16, 3e-2)])
def test_every_impl_and_ablation_takes_input_of_another_dtype_than_its_weights(w_dtype, x_dtype, tol):
    """Q is cast to the input's dtype on every path, as the sym form did: 'cov' with a float64 map raised
    'expected scalar type Double', 'full' with bf16 or float64 weights 'mat1 and mat2 must have the same
    dtype'. Output in x's dtype, the formula's value (the map's own numbers in float64), sym = full;
    Q's gradient in Q's dtype."""
    torch.manual_seed(0)
    q = torch.randn(3, 4, 4, dtype=torch.float64).to(w_dtype).double()       # representable in w_dtype
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64).to(x_dtype)
    xd = x.double()
    d = xd - xd.mean((2, 3), keepdim=True)
    want = {"none": channel_formula(xd, q), "cov": channel_formula(xd, q) - channel_formula(d, q)}
    for ablation in ABLATIONS:
        outs = []
        for impl in IMPLS:
            layer = QuadraticChannel(4, 3, impl=impl, ablation=ablation).to(w_dtype)
            with torch.no_grad():
                layer.weight.copy_(q)
            out = layer(x)
            assert out.dtype == x_dtype, (impl, ablation)
            assert rel_err(out.double(), want[ablation]) < tol, (impl, ablation)
            out.float().sum().backward()
            assert layer.weight.grad.dtype == w_dtype
            outs.append(out.double())
        assert rel_err(outs[0], outs[1]) < tol, ablation


@pytest.mark.parametrize("c", [1, 16, 72])      # both CPU branches of dL/dx: outer products (C <= 64), triangle rows
def test_channel_backward_under_cpu_bf16_autocast(c):
    """Under torch.autocast('cpu', bfloat16) the sym layer's backward once mixed a float32 factor
    into a bf16 matmul (C <= 64) and raised; gradients now come back in float32, near float64's."""
    torch.manual_seed(0)
    layer = QuadraticChannel(c)
    with torch.no_grad():
        layer.weight.normal_(std=0.05)
    x = torch.randn(2, c, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    xd = x.detach().double().requires_grad_()
    wd = layer.weight.detach().double().requires_grad_()
    channel_formula(xd, wd).sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert rel_err(x.grad, xd.grad) < 3e-2 and rel_err(layer.weight.grad, wd.grad) < 3e-2


@pytest.mark.parametrize("strategy", ["outer", "gather"])
def test_plain_expression_strategies_under_bf16_autocast(strategy):
    """'outer' (CUDA's eager default for C <= 64) and 'gather' under bf16 autocast, here on the CPU
    (the same operators): output and gradients in the products' dtype, within bf16's rounding of
    the float64 formula."""
    torch.manual_seed(0)
    x = torch.randn(300, 24, dtype=torch.float64)
    q = 0.1 * torch.randn(8, 24, 24, dtype=torch.float64)
    xs, qs = x.float().requires_grad_(), q.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_quadratic(xs, qs, strategy=strategy)
    assert out.dtype == torch.bfloat16
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    x64, q64 = x.clone().requires_grad_(), q.clone().requires_grad_()
    want = torch.einsum("oij,mi,mj->mo", q64, x64, x64)
    want.backward(g)
    assert rel_err(out.double(), want) < 1e-2
    assert rel_err(xs.grad.double(), x64.grad) < 2e-2 and rel_err(qs.grad.double(), q64.grad) < 2e-2


@pytest.mark.parametrize("c,c_out", [(5, 3), (16, 16), (32, 32), (40, 7), (96, 4)])
def test_cpu_kernels_with_bf16_products_under_autocast(monkeypatch, c, c_out):
    """Under CPU bf16 autocast the C++ kernels form the products from float32 x, round them to bf16
    for bf16 matmuls (float32 sums over the blocks, here of 7 rows) and unfold a bf16 dL/d(products):
    output bf16, every value within bf16 rounding of float64 (relative error < 1e-2, ~3e-3 measured)."""
    from bionets.layers import quadratic_sym
    own_cpu_kernels("quadratic_cpu")
    monkeypatch.setattr(quadratic_sym, "_block_rows", lambda k: 7)
    torch.manual_seed(0)
    x = torch.randn(60, c, requires_grad=True)
    q = (0.1 * torch.randn(c_out, c, c)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_quadratic(x, q)
    g = torch.randn(60, c_out)
    out.backward(g.bfloat16())
    xd, qd = x.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    want = torch.einsum("oij,mi,mj->mo", qd, xd, xd)
    want.backward(g.double())
    assert out.dtype == torch.bfloat16 and x.grad.dtype == q.grad.dtype == torch.float32
    assert max(rel_err(out, want), rel_err(x.grad, xd.grad), rel_err(q.grad, qd.grad)) < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channel_on_cuda_with_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 40, 40, device="cuda", requires_grad=True)
    layers = {impl: QuadraticChannel(16, impl=impl).cuda() for impl in ("sym", "full")}
    with torch.no_grad():
        layers["sym"].weight.normal_(std=0.05)
        layers["full"].weight.copy_(layers["sym"].weight)
    expected = channel_formula(x.double(), layers["sym"].weight.double())
    assert rel_err(layers["sym"](x).double(), expected) < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = {impl: layer(x) for impl, layer in layers.items()}
    assert rel_err(out["sym"].double(), expected) < 2e-2
    for impl in out:
        out[impl].float().square().sum().backward()
    assert rel_err(layers["sym"].weight.grad, layers["full"].weight.grad) < 3e-2


# ---------------------------------------------------------------- QuadraticPixel

def pixel_formula(layer, x):
    """BN_a(W_a * x) . BN_b(W_b * x) + BN_c(W_c * x) (eval-mode BN), the product as a quadratic form
    over every pair of (channel, window position) of the k x k receptive field."""
    k = layer.branch_a[0].kernel_size[0]
    n, c, h, w = x.shape
    patches = F.unfold(x, k, padding=k // 2).view(n, c, k * k, h * w)       # x(p + u) for every u

    def bn(z, norm):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return (z - norm.running_mean[None, :, None]) * scale[None, :, None] + norm.bias[None, :, None]

    def dense(conv):   # [out, in, k*k] with zeros outside each group
        g, o = conv.groups, conv.out_channels
        weight = torch.zeros(o, c, k * k, dtype=x.dtype)
        for out_ch in range(o):
            grp = out_ch // (o // g)
            weight[out_ch, grp * (c // g):(grp + 1) * (c // g)] = conv.weight[out_ch].reshape(c // g, k * k)
        return weight

    wa, wb = dense(layer.branch_a[0]), dense(layer.branch_b[0])
    na, nb = layer.branch_a[1], layer.branch_b[1]
    sa = na.weight / torch.sqrt(na.running_var + na.eps)
    sb = nb.weight / torch.sqrt(nb.running_var + nb.eps)
    ba = na.bias - na.running_mean * sa
    bb = nb.bias - nb.running_mean * sb
    pair = torch.einsum("ocu,odv->ocudv", wa, wb)                             # A_o over (c,u) x (d,v)
    quad = torch.einsum("ocudv,ncup,ndvp->nop", pair, patches, patches)
    lin_a = torch.einsum("ocu,ncup->nop", wa, patches)
    lin_b = torch.einsum("ocu,ncup->nop", wb, patches)
    out = (sa * sb)[None, :, None] * quad + (sa * bb)[None, :, None] * lin_a \
        + (sb * ba)[None, :, None] * lin_b + (ba * bb)[None, :, None]
    if layer.branch_c is not None:
        out = out + bn(torch.einsum("ocu,ncup->nop", dense(layer.branch_c[0]), patches), layer.branch_c[1])
    return out.view(n, -1, h, w)


def random_pixel(**kw):
    layer = QuadraticPixel(**kw).double().eval()
    with torch.no_grad():
        for norm in layer.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.normal_(), norm.bias.normal_(), norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("kw", [dict(in_channels=3, out_channels=4, kernel_size=3),
                                dict(in_channels=4, kernel_size=7, groups=4, linear=False)])
def test_pixel_matches_formula(kw):
    torch.manual_seed(0)
    layer = random_pixel(**kw)
    x = torch.randn(2, kw["in_channels"], 8, 9, dtype=torch.float64)
    expected = pixel_formula(layer, x)
    assert rel_err(layer(x), expected) < 1e-6
    assert rel_err(layer.float()(x.float()).double(), expected) < 1e-4


def test_pixel_starts_at_zero_and_gradchecks():
    torch.manual_seed(0)
    layer = QuadraticPixel(3, kernel_size=3, linear=False).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert layer(x).abs().sum() == 0
    assert layer.extra_params == 2 * (3 * 3 * 9 + 2 * 3)
    with torch.no_grad():
        layer.branch_b[1].weight.normal_()
    assert torch.autograd.gradcheck(layer, (x,))
    with pytest.raises(BionetsError, match="odd"):
        QuadraticPixel(3, kernel_size=4)
    with pytest.raises(BionetsError, match="True or False for linear='false'"):
        QuadraticPixel(3, linear="false")


def test_pixel_checks_input_as_the_channel_term_does():
    """Integer maps refused, empty maps give empty output (the convolutions raised 'Kernel size can't be
    greater than actual input size') that backward goes through, either term (enabled or not)."""
    layer = QuadraticPixel(4, 3)
    with pytest.raises(BionetsError, match="takes floating-point input, got torch.int64"):
        layer(torch.ones(2, 4, 3, 3, dtype=torch.long))
    for shape in ((2, 4, 0, 0), (2, 4, 0, 5), (0, 4, 3, 3)):
        for enabled in (True, False):
            layer.enabled = enabled
            for term in (layer, QuadraticChannel(4, 3)):
                x = torch.randn(shape, requires_grad=True)
                y = term(x)
                y.sum().backward()
                assert y.shape == (shape[0], 3, *shape[2:]) and x.grad.shape == shape


@pytest.mark.parametrize("w_dtype,x_dtype,tol", [(torch.float32, torch.float64, 1e-5),
                                                 (torch.float64, torch.float32, 1e-5),
                                                 (torch.float32, torch.bfloat16, 2e-2)])
def test_pixel_takes_input_of_another_dtype_than_its_weights(w_dtype, x_dtype, tol):
    """Computed in the weights' dtype (the BatchNorms' running statistics stay in theirs), output in x's
    dtype as QuadraticChannel's; a float64 map raised a raw RuntimeError."""
    torch.manual_seed(0)
    layer = random_pixel(in_channels=4, out_channels=3, kernel_size=3)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64).to(x_dtype)
    want = pixel_formula(layer, x.double())
    out = layer.to(w_dtype)(x)
    assert out.dtype == x_dtype and rel_err(out.double(), want) < tol
    layer.train()
    out = layer(x)
    assert out.dtype == x_dtype and layer.branch_a[1].running_mean.dtype == w_dtype


# ---------------------------------------------------------------- set_quadratic

def test_set_quadratic_switches_named_blocks():
    model = nn.Sequential()
    model.add_module("a", nn.Sequential(QuadraticChannel(2)))
    model.add_module("b", nn.Sequential(QuadraticPixel(2, linear=False)))
    assert set_quadratic(model, False, ["a"]) == ["a.0"]
    assert not model.a[0].enabled and model.b[0].enabled
    assert set_quadratic(model, False) == ["a.0", "b.0"]
    assert set_quadratic(model, True, ["b.0"]) == ["b.0"] and model.b[0].enabled
    with pytest.raises(BionetsError, match="unknown quadratic block 'c'"):
        set_quadratic(model, False, ["c"])
    with pytest.raises(BionetsError, match="no quadratic term"):
        set_quadratic(nn.Linear(2, 2), False)


def test_set_quadratic_refuses_a_string_of_names_a_truthy_flag_and_a_non_module():
    """'10' was read a character at a time (blocks '1' and '0'), enabled='false' switched every term on
    (a truthy string), a non-module raised AttributeError; nothing is switched on an error."""
    model = nn.Sequential(*(nn.Sequential(QuadraticChannel(2)) for _ in range(11)))
    with pytest.raises(BionetsError, match=r"got the string '10': write \['10'\]"):
        set_quadratic(model, False, "10")
    with pytest.raises(BionetsError, match="enabled=True or False, got 'false'"):
        set_quadratic(model, "false")
    with pytest.raises(BionetsError, match="names .*got 10"):
        set_quadratic(model, False, [10])
    assert all(term.enabled for term in model.modules() if isinstance(term, QuadraticChannel))
    with pytest.raises(BionetsError, match="takes a torch.nn.Module, got dict"):
        set_quadratic({"a": model}, False)
    assert set_quadratic(model, False, ("10",)) == ["10.0"] and not model[10][0].enabled and model[1][0].enabled


@pytest.mark.parametrize("c,c_out", [(5, 3), (40, 2), (70, 2)])
def test_rows_kernels_across_many_chunks(monkeypatch, c, c_out):
    """Every CPU layout (see _PRODUCTS_BY_COLUMN_MAX_C) cut into 7-row chunks, the last one short,
    against the all-products form."""
    from bionets.layers import quadratic_sym
    monkeypatch.setattr(quadratic_sym, "_chunks", lambda rows, per_row, cpu_rows=0:
                        [slice(r0, r0 + 7) for r0 in range(0, rows.shape[0], 7)])
    torch.manual_seed(0)
    x = torch.randn(30, c, dtype=torch.float64, requires_grad=True)
    q = torch.randn(c_out, c, c, dtype=torch.float64, requires_grad=True)
    out = channel_quadratic(x, q, strategy="rows")
    assert rel_err(out, torch.einsum("oij,mi,mj->mo", q, x, x)) < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, q), g)
    want = torch.autograd.grad(channel_quadratic(x, q, impl="full"), (x, q), g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(got, want))


@pytest.mark.parametrize("c,c_out", [(1, 2), (5, 3), (16, 16), (20, 9), (32, 32), (48, 5), (64, 3), (96, 4), (128, 2)])
def test_rows_cpu_kernels_in_float32_across_chunks(monkeypatch, c, c_out):
    """float32 rows take the C++ kernels (quadratic_cpu.cpp: each channel count they unroll for, and
    the general loop), here in blocks of 7 rows, the last one short, shared by the threads; the
    output's gradient arrives column-major: output and both gradients within float32 rounding of the
    float64 computation (relative error < 1e-5; the issue asks 1e-4)."""
    from bionets.layers import quadratic_sym
    own_cpu_kernels("quadratic_cpu")
    monkeypatch.setattr(quadratic_sym, "_block_rows", lambda k: 7)
    torch.manual_seed(0)
    x = torch.randn(30, c, dtype=torch.float64)
    q = torch.randn(c_out, c, c, dtype=torch.float64)
    g = torch.randn(30, c_out, dtype=torch.float64)
    x32, q32 = x.float().requires_grad_(), q.float().requires_grad_()
    assert quadratic_sym._cpu_kernels(x32, q32[0]) is not None
    out = channel_quadratic(x32, q32, strategy="rows")
    got = (out, *torch.autograd.grad(out, (x32, q32), g.float().t().contiguous().t()))
    x64, q64 = x.requires_grad_(), q.requires_grad_()
    out64 = torch.einsum("oij,mi,mj->mo", q64, x64, x64)
    want = (out64, *torch.autograd.grad(out64, (x64, q64), g))
    assert all(a.dtype == torch.float32 and rel_err(a.double(), b) < 1e-5 for a, b in zip(got, want))


def test_rows_without_cpu_kernels_gives_the_same_result(monkeypatch):
    """BIONETS_CPU_KERNELS=0 (or no compiler) leaves float32 rows to the PyTorch path: same values."""
    from bionets.layers import cpu_kernels, quadratic_sym
    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    q = torch.randn(6, 24, 24, requires_grad=True)
    out = channel_quadratic(x, q)
    first = (out, *torch.autograd.grad(out, (x, q), torch.ones_like(out)))
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("BIONETS_CPU_KERNELS", "0")
    assert quadratic_sym._cpu_kernels(x, q[0]) is None
    out = channel_quadratic(x, q)
    second = (out, *torch.autograd.grad(out, (x, q), torch.ones_like(out)))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(first, second))


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_low_precision_on_the_cpu_is_rounded_once(monkeypatch, kernels):
    """bf16 (autocast or a bf16 module) and fp16 on the CPU, with the C++ kernels or without them: the
    sums in float32, one rounding (~3e-3 relative; without the kernels the per-triangle-row sums in
    bf16 gave 2e-2 at C = 200). A float64 input under bf16 autocast stays float64, as autocast leaves it."""
    from bionets.layers import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("BIONETS_CPU_KERNELS", kernels)
    torch.manual_seed(0)
    x = torch.randn(128, 200, dtype=torch.float64)
    q = torch.randn(4, 200, 200, dtype=torch.float64)
    g = torch.randn(128, 4, dtype=torch.float64)
    x64 = x.clone().requires_grad_()
    want = channel_quadratic(x64, q)
    want_dx, = torch.autograd.grad(want, x64, g)
    for dtype, autocast in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)):
        xl = (x.float() if autocast else x.to(dtype)).requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = channel_quadratic(xl, q.float() if autocast else q.to(dtype))
        dx, = torch.autograd.grad(out, xl, g.to(out.dtype))
        assert out.dtype == dtype
        assert rel_err(out.double(), want) < 6e-3 and rel_err(dx.double(), want_dx) < 6e-3, (dtype, autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_quadratic(x, q)
    assert out.dtype == torch.float64 and rel_err(out, want) < 1e-12


def test_cpu_scratch_is_reused_and_freed():
    """The CPU kernels keep their scratch buffers between steps (no page faults per step), per
    thread, and free_scratch lets them go; results do not depend on what the buffers held."""
    from bionets.layers import scratch
    torch.manual_seed(0)
    x = torch.randn(300, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 6, 6, dtype=torch.float64, requires_grad=True)
    scratch.free_scratch()
    first = torch.autograd.grad(channel_quadratic(x, q).square().sum(), (x, q))
    held = {k: v.data_ptr() for k, v in scratch._SCRATCH.buffers.items()}
    assert {k[0] for k in held} >= {"row_products", "products", "outer"}
    second = torch.autograd.grad(channel_quadratic(x, q).square().sum(), (x, q))
    assert {k: v.data_ptr() for k, v in scratch._SCRATCH.buffers.items()} == held
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    scratch.free_scratch()
    assert not hasattr(scratch._SCRATCH, "buffers")


# ---------------------------------------------------------------- under torch.compile (CPU)

@pytest.mark.parametrize("strategy", ["rows", "blocks"])
def test_sym_quadratic_operator_registration(strategy):
    """The sym form as a torch operator (what a model compiled on the CPU runs): its fake (shape)
    function, autograd and schema pass torch.library.opcheck."""
    from bionets.layers.quadratic_sym import indices, sym_quadratic_op
    rows = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    products = len(indices(6, strategy, rows.device)[0])      # 21 pairs i <= j; 'blocks': 36 (one block)
    s = torch.randn(products, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(sym_quadratic_op, (rows, s, strategy))


@needs_cpu_compiler
def test_compiled_model_runs_the_quadratic_layer_as_one_operator():
    """torch.compile of a model holding the sym layer, on the CPU: the layer is one opaque operator
    (not its unrolled chunk loops), with the same outputs and gradients as the eager model, also when
    the input needs no gradient."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), QuadraticChannel(8))
    with torch.no_grad():
        model[1].weight.normal_(std=0.1)
    backend = CompileCounterWithBackend("inductor")
    assert_compiled_matches_eager(model, torch.randn(2, 3, 6, 6), backend=backend, rtol=1e-5, atol=1e-6,
                                  grad_tol=1e-5)
    graph = backend.graphs[0].code
    assert backend.frame_count == 1 and "bionets.sym_quadratic" in graph and "addmm" not in graph
    layer = torch.compile(QuadraticChannel(8))
    rows = torch.randn(2, 8, 3, 3)
    layer(rows).sum().backward()                               # only dL/dQ wanted
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_channel_term_on_an_empty_batch(fmt):
    """A batch of 0 images (the tail of a sharded dataset) gives an empty output and zero gradients."""
    layer = QuadraticChannel(8, 3)
    x = torch.randn(0, 8, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and x.grad.shape == x.shape and not layer.weight.grad.any()
