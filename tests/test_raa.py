"""RAA against its formula in float64, gradients, the swap on timm models, and training."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from bionets.errors import BionetsError
from bionets.layers.raa import RAA
from bionets.layers.raa_swap import RAAByWidth, swap_activations
from compile_helpers import assert_compiled_matches_eager, needs_cpu_compiler, output_dtype_under_bf16_autocast


def phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def direct(x, raa, dim):
    """RAA written out per vector: shift = v.x + c (or c, or W x + c), x * Phi(x + shift) / relu."""
    xm = x.movedim(dim, -1)
    if raa.variant == "scalar":
        shift = raa.c
    elif raa.variant == "vector":
        shift = (xm * raa.v).sum(-1, keepdim=True) + raa.c
    else:
        shift = torch.einsum("oc,...c->...o", raa.W, xm) + raa.c
    out = torch.relu(xm + shift) if raa.base == "relu" else xm * phi(xm + shift)
    return out.movedim(-1, dim)


def randomized(raa):
    with torch.no_grad():
        for p in raa.parameters():
            p.normal_(0, 0.3)
    return raa


@pytest.mark.parametrize("variant", ["vector", "scalar", "matrix"])
@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("shape, dim", [((3, 5, 4, 4), 1), ((2, 7, 5), -1), ((6, 5), -1), ((2, 5, 6), 1),
                                        ((2, 5, 3, 4, 2), 1), ((6, 5), 1)])
def test_raa_matches_formula_float64(variant, base, shape, dim):
    """Tokens and vectors on the last dim; the channels of 2-D maps, of Conv1d's [N, C, L] and of
    Conv3d's [N, C, D, H, W] outputs on dim 1 (and dim 1 of [N, C] is its last)."""
    raa = randomized(RAA(shape[dim], variant, base, dim=dim)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(raa(x), direct(x, raa, dim), rtol=1e-12, atol=1e-12)
    if len(shape) in (3, 5) and dim == 1:         # found per call: dim 1 where the last dim is no feature width
        per_call = randomized(RAA(shape[dim], variant, base)).double()
        torch.testing.assert_close(per_call(x), direct(x, per_call, dim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, fmt", [((2, 4, 5), None), ((2, 4, 3, 2, 2), torch.channels_last_3d)])
def test_raa_on_conv1d_and_conv3d_maps_in_float32_and_its_gradients(shape, fmt):
    """The float32 path (through RAA's own kernels on the map read as [N, C, L, 1] or [N, C, D, H W])
    against float64, gradients of x, v and c included, and a gradcheck."""
    raa = randomized(RAA(4, dim=1)).double()
    x64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: raa(x), (x64, *raa.parameters()))
    want = torch.autograd.grad(direct(x64, raa, 1).square().sum(), (x64, raa.vc))
    raa32 = RAA(4, dim=1)
    raa32.load_state_dict(raa.state_dict())
    x = x64.detach().float()
    x = (x.contiguous(memory_format=fmt) if fmt else x).requires_grad_()
    out = raa32(x)
    assert out.shape == x.shape
    got = torch.autograd.grad(out.square().sum(), (x, raa32.vc))
    torch.testing.assert_close(out.double(), direct(x64, raa, 1), rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_raa_starts_as_exact_gelu_and_relu():
    x = torch.randn(4, 8, 3, 3)
    x64 = x.double()
    torch.testing.assert_close(RAA(8).double()(x64), x64 * torch.special.ndtr(x64), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(RAA(8)(x), torch.nn.functional.gelu(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(RAA(8, base="relu")(x), torch.relu(x))


@pytest.mark.parametrize("variant", ["vector", "scalar", "matrix"])
@pytest.mark.parametrize("base", ["gelu", "relu"])
def test_raa_gradcheck(variant, base):
    raa = randomized(RAA(4, variant, base)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: raa(x), (x, *raa.parameters()))


LAYOUTS = {"contiguous": lambda x: x,
           "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
           "strided": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2)}


@pytest.mark.parametrize("variant", ["scalar", "matrix"])
def test_raa_at_a_zero_shifted_input_and_under_a_nan_shift(variant):
    """Phi(z) comes from gelu(z) / z: at z = x + shift = 0 exactly (0/0) the value and gradients are
    still the formula's, and a NaN shift still gives NaN (the 0/0 repair must not hide it)."""
    raa = RAA(3, variant).double()
    with torch.no_grad():
        raa.c.fill_(0.5)
    x = torch.tensor([[-0.5, 1.0, -0.5], [-0.5, -0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    out = raa(x)
    got = torch.autograd.grad(out.sum(), (x, raa.c))
    want = torch.autograd.grad(direct(x, raa, -1).sum(), (x, raa.c))
    torch.testing.assert_close(out, direct(x, raa, -1), rtol=1e-13, atol=1e-15)
    assert out[0, 0].item() == -0.25                      # x Phi(0) = x / 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        raa.c.fill_(float("nan"))
    assert raa(x.detach()).isnan().all()
    # an infinite shift: Phi's limits (1 and 0), as the kernels give, not the inf / inf of gelu(z) / z
    for shift, want in ((float("inf"), x.detach()), (float("-inf"), torch.zeros_like(x))):
        with torch.no_grad():
            raa.c.fill_(shift)
        assert torch.equal(raa(x.detach()), want)


@pytest.mark.parametrize("variant", ["vector", "scalar"])
@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_raa_gradients_match_formula_in_every_layout(variant, base, layout):
    """The hand-written backward (shift included) gives autograd's gradients of the direct formula,
    for NCHW, channels_last and other strided maps, and for token tensors."""
    for shape, dim in [((3, 5, 4, 6), 1), ((2, 7, 5), -1)]:
        raa = randomized(RAA(shape[dim], variant, base)).double()
        x = torch.randn(*shape, dtype=torch.float64)
        x = (LAYOUTS[layout](x) if x.ndim == 4 else x).requires_grad_()
        out = raa(x)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, *raa.parameters()), g)
        want = torch.autograd.grad(direct(x, raa, dim), (x, *raa.parameters()), g)
        torch.testing.assert_close(out, direct(x, raa, dim), rtol=1e-12, atol=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_raa_under_bfloat16_autocast_keeps_the_input_dtype():
    raa = randomized(RAA(5))
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = raa(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and raa.vc.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), direct(x.bfloat16().float(), raa, 1), rtol=2e-2, atol=2e-2)
    for variant in ("vector", "scalar", "matrix"):
        for base in ("gelu", "relu"):                              # with and without autocast
            half, xb = randomized(RAA(5, variant, base)), x.detach().bfloat16().requires_grad_()
            assert half(xb.detach()).dtype == torch.bfloat16
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = half(xb)
            assert out.dtype == torch.bfloat16, (variant, base)
            out.float().sum().backward()
            assert xb.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in half.parameters())


@needs_cpu_compiler
@pytest.mark.parametrize("variant, base, shape, dim", [("vector", "gelu", (3, 5, 4, 4), 1),
                                                       ("matrix", "relu", (2, 7, 5), -1),
                                                       ("scalar", "gelu", (6, 5), -1)])
def test_compiled_raa_matches_formula_and_eager_gradients(variant, base, shape, dim):
    """The fused (torch.compile) path: the same values as the direct formula and the same gradients
    as the eager path."""
    eager = randomized(RAA(shape[dim], variant, base)).double()
    fused = RAA(shape[dim], variant, base, compiled=True).double()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = fused(x)
    torch.testing.assert_close(out, direct(x, eager, dim), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *fused.parameters()), g)
    want = torch.autograd.grad(eager(x), (x, *eager.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, kwargs, n_act, added", [
    ("resnet18", {}, 17, None),
    ("convnext_atto", {}, 12, None),
    ("vit_tiny_patch16_224", {"img_size": 32}, 12, 12 * 769),
    ("resnet20_cifar", {}, 19, 7 * 17 + 6 * 33 + 6 * 65),   # stem + two per block, v and c per width
])
def test_swap_on_timm_models(name, kwargs, n_act, added):
    model = timm.create_model(name, num_classes=10, **kwargs)
    before = sum(p.numel() for p in model.parameters())
    replaced = swap_activations(model)
    assert len(replaced) == n_act
    assert not [n for n, m in model.named_modules() if type(m).__name__ in ("ReLU", "GELU", "SiLU")]
    gained = sum(p.numel() for p in model.parameters()) - before
    assert gained == sum(n for _, n in replaced) and (added is None or gained == added)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(m.shift_params.grad is not None for m in model.modules() if isinstance(m, RAA))
    assert swap_activations(model) == []                                     # idempotent


def test_raa_bad_input():
    with pytest.raises(BionetsError, match="variant"):
        RAA(4, variant="diag")
    with pytest.raises(BionetsError, match=r"built for 4 features got a tensor of shape \(2, 5\) \(it takes them on dim "
                                           r"1 of an \[N, C, ...\] map or on the last dim\); where a swap built it"):
        RAA(4)(torch.randn(2, 5))                     # (a layer built by hand: the swap's advice came first)
    with pytest.raises(BionetsError, match="RAA takes floating-point input, got torch.int64"):
        RAA(4)(torch.tensor([[3, 5, 7, 9]]))          # (it returned [[2, 4, 7, 9]])
    with pytest.raises(BionetsError, match=r"RAA takes a torch.Tensor, got ndarray: convert it \(torch.as_tensor"):
        RAA(4)(torch.randn(2, 4).numpy())             # (an AttributeError)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(BionetsError, match="example_input takes one input tensor of the model, got list"):
        swap_activations(model, example_input=[1.0, 2.0])                  # (an AttributeError)
    from bionets.layers.raa_swap import RAAByWidth
    with pytest.raises(BionetsError, match="RAAByWidth needs one or more widths"):
        RAAByWidth([])                                # (built, then failed at every call)
    with pytest.raises(BionetsError, match=r"RAAByWidth has RAA for widths \['3', '4'\], got a tensor of shape \(\)"):
        RAAByWidth([3, 4])(torch.tensor(1.0))         # (an IndexError)
    with pytest.raises(BionetsError, match=r"patterns takes a list .*got the string '1\*': write \['1\*'\]"):
        swap_activations(model, patterns="1*")        # ('*' alone matched every activation)
    with pytest.raises(BionetsError, match="swap_activations takes a torch.nn.Module, got int"):
        swap_activations(5)
    with pytest.raises(BionetsError, match=r"RAA's types are activation classes or their names .*got 1 \(int\)"):
        swap_activations(model, types=[1])            # (an AttributeError: no .lower())
    assert [name for name, _ in swap_activations(model, types=[torch.nn.ReLU])] == ["1", "3"]   # classes, or names


def test_raa_trains_on_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))
    swap_activations(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert losses[-1] < 0.3 * losses[0] and acc > 0.9
    # the shift learned something the trained model uses: with v and c back at zero (plain GELU) the
    # loss rises (0.096 -> 0.106 measured; a nonzero v, after any one step, passed before)
    with torch.no_grad():
        trained = torch.nn.functional.cross_entropy(model(x), y).item()
        model[1].v.zero_()
        model[1].c.zero_()
        assert torch.nn.functional.cross_entropy(model(x), y).item() > 1.05 * trained


def _bottleneck_raa_params():
    """torchvision's resnet50: the stem's relu (64) and, per Bottleneck of width w, one RAA at w
    (after bn1 and bn2) and one at 4w (after the residual sum): v and c per width."""
    return 65 + sum(n * ((w + 1) + (4 * w + 1)) for n, w in ((3, 64), (4, 128), (6, 256), (3, 512)))


def test_swap_with_example_input_gives_each_width_its_own_raa():
    """An activation module called at several widths (torchvision's Bottleneck) gets one RAA per
    width from a probe forward pass; the probe changes neither the mode nor the BN statistics."""
    import torchvision
    model = torchvision.models.resnet50(num_classes=10)
    stats = model.bn1.running_mean.clone()
    before = sum(p.numel() for p in model.parameters())
    replaced = swap_activations(model, example_input=torch.randn(2, 3, 32, 32))
    assert model.training and torch.equal(model.bn1.running_mean, stats)
    assert len(replaced) == 17 and isinstance(model.relu, RAA)
    block = model.layer2[0].relu
    assert isinstance(block, RAAByWidth) and sorted(map(int, block.by_width)) == [128, 512]
    assert sum(p.numel() for p in model.parameters()) - before == sum(n for _, n in replaced) == _bottleneck_raa_params()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(raa.vc.grad is not None for raa in model.modules() if isinstance(raa, RAA))


def test_swap_without_example_input_names_the_fix_for_shared_activations():
    import torchvision
    model = torchvision.models.resnet50(num_classes=10)
    swap_activations(model)
    with pytest.raises(BionetsError, match="called at several widths.*example_input"):
        model(torch.randn(1, 3, 32, 32))


def test_example_input_corrects_widths_of_layers_registered_out_of_call_order():
    """torchvision's SqueezeExcitation registers fc2 before the relu that follows fc1: the width read
    from registration order is wrong, the probe's is right (the relu runs at fc1's width)."""
    import torchvision
    model = torchvision.models.efficientnet_b0(num_classes=10)
    se = model.features[1][0].block[1]
    swap_activations(model, example_input=torch.randn(2, 3, 32, 32))
    assert isinstance(se.activation, RAA) and se.activation.num_features == se.fc1.out_channels
    model(torch.randn(2, 3, 32, 32)).sum().backward()


class _TokenMlp(nn.Module):
    """A 1x1 conv registered before a GELU that runs on [N, L, C] tokens (timm's PVT-v2 MLP, whose
    depth-wise conv reshapes back to tokens), and activations called as functions in forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(4, 4, 1), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        tokens = self.act(self.conv(x).flatten(2).transpose(1, 2))
        return self.head(F.relu(tokens) + F.gelu(tokens) + torch.relu(tokens)).mean(1)


def test_width_probe_takes_the_feature_axis_from_the_calls_and_counts_functions():
    """The probe puts RAA on the axis the calls showed (the last: tokens), not the conv's channel
    axis, and counts the activations called as functions outside activation modules, by caller;
    a TorchScript submodule, which takes no hooks, is run through as it is."""
    from bionets.layers.raa_swap import find_activations, probe_activations
    model, x = _TokenMlp(), torch.randn(2, 4, 3, 3)
    probe = probe_activations(model, find_activations(model), x)
    assert probe.widths == {"act": [4]} and probe.axes == {"act": {-1}}
    assert probe.functions == {"relu (in _TokenMlp.forward)": 2, "gelu (in _TokenMlp.forward)": 1}
    assert not probe.activation_like
    swap_activations(model, example_input=x)
    assert model.act.dim == -1 and model(x).shape == (2, 2)
    scripted = nn.Sequential(nn.Linear(4, 4), torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), nn.ReLU())
    assert probe_activations(scripted, find_activations(scripted), torch.randn(2, 4)).widths == {"2": [4]}
    unprobed = _TokenMlp()
    swap_activations(unprobed)
    with pytest.raises(BionetsError, match="RAA built for 4 features got a tensor of shape"):
        unprobed(x)


def test_call_width_reads_nhwc_maps_whose_width_the_layers_got_wrong():
    """timm's MambaOut registers a 256-wide layer before a GELU that runs on [N, H, W, 128] maps:
    the square spatial dims of the probe's input tell NHWC (dims 1, 2) from NCHW (dims 2, 3)."""
    from bionets.layers.raa_swap import _call_width
    assert _call_width(torch.zeros(2, 56, 56, 128), 256) == (128, -1)
    assert _call_width(torch.zeros(2, 128, 56, 56), 256) == (128, 1)
    assert _call_width(torch.zeros(2, 8, 8, 8), 8) == (8, None)             # C = H: no axis shown
    assert _call_width(torch.zeros(2, 8, 196, 16), 4) == (16, -1)           # no map: the last dim
    assert _call_width(torch.zeros(2, 5, 7), 3) == (7, -1)


def test_probe_leaves_every_module_mode_and_neuron_state_as_it_was():
    """A model frozen in part (a submodule in eval mode inside a training model) keeps each mode;
    SpikingJelly's neurons hold no state from the probe's forward pass, and the probe draws no
    random numbers (its dropout runs in eval mode), so a seeded run is the same with or without it."""
    from spikingjelly.activation_based import neuron
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), neuron.LIFNode(),
                          nn.Dropout(0.5))
    model[1].bias.data.fill_(0.7)                    # spikes, so the neurons' state would change
    model[1].eval()
    x, rng = torch.randn(2, 3, 6, 6), torch.get_rng_state()
    swap_activations(model, example_input=x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model[1].training and model[3].training
    assert isinstance(model[3].v, float) and model[3].v == 0.0


def test_width_probe_reports_a_model_error_in_one_line():
    model = timm.create_model("resnet20_cifar", num_classes=10)
    with pytest.raises(BionetsError, match=r"width probe: the model failed on an input of shape \[2, 5, 8, 8\]"):
        swap_activations(model, example_input=torch.randn(2, 5, 8, 8))


@needs_cpu_compiler
@pytest.mark.parametrize("variant, base", [("vector", "gelu"), ("vector", "relu"), ("scalar", "relu"),
                                           ("matrix", "gelu")])
def test_raa_inside_a_compiled_model(variant, base):
    """``torch.compile`` of a whole model (the engine's ``train.compile``): RAA gives Inductor its
    plain expression to fuse and differentiate; the same outputs and gradients as the eager module,
    and under bf16 autocast the activation's output keeps its input's dtype."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                                randomized(RAA(6, variant, base)), torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 4))
    x = torch.randn(2, 3, 5, 5)
    assert_compiled_matches_eager(model, x)
    assert output_dtype_under_bf16_autocast(model, model[2], x) == torch.bfloat16


@pytest.mark.parametrize("name, kwargs", [("convnext_atto", {}), ("vit_tiny_patch16_224", {"img_size": 32}),
                                          ("resnet20_cifar", {})])
def test_width_probe_agrees_where_registration_order_is_right(name, kwargs):
    """On timm's models (one activation module per call, registered in call order; ConvNeXt's MLP
    on channels-last [N, H, W, C] maps) the probe finds the widths read from the layers."""
    plain = timm.create_model(name, num_classes=10, **kwargs)
    probed = timm.create_model(name, num_classes=10, **kwargs)
    assert swap_activations(probed, example_input=torch.randn(2, 3, 32, 32)) == swap_activations(plain)
    assert not any(isinstance(m, RAAByWidth) for m in probed.modules())


def test_a_machine_where_triton_cannot_run_falls_back_to_the_pytorch_path(monkeypatch):
    """Triton builds its kernels (and a C launcher) at first use; where that fails (no C compiler, an
    old driver), RAA warns once and computes the same values with its PyTorch path."""
    import bionets.layers.raa as raa_module
    from bionets.layers import kernel_fallback

    class Broken:
        @staticmethod
        def ncp_layout(x, dim):
            return (1, 1, 1, 1, 1, 1)

        @staticmethod
        def forward(*args, **kwargs):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(raa_module, "raa_triton", lambda: Broken)
    monkeypatch.setattr(raa_module, "_own_kernels", lambda *args: None)      # as on a GPU without nvcc
    monkeypatch.setattr(kernel_fallback, "_FAILED", {})
    monkeypatch.setattr(raa_module, "_triton_layout",
                        lambda x, dim: None if kernel_fallback.failed_on("raa", x.device) else Broken.ncp_layout(x, dim))
    torch.manual_seed(0)
    layer = RAA(6)
    with torch.no_grad():
        layer.v.normal_(0, 0.3)
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="Failed to find C compiler.*PyTorch path"):
        out = layer(x)
    out.sum().backward()
    assert kernel_fallback.failed_on("raa", x.device) and not kernel_fallback.failed_on("raa", "cuda:1")
    x2 = x.detach().clone().requires_grad_()
    want = layer(x2)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x2.grad)


def test_model_with_raa_exports_to_onnx(tmp_path):
    """A ResNet-20 with RAA (its shifts made non-zero) through torch.onnx.export, which traces RAA's
    plain expression: ONNX Runtime gives the model's logits."""
    ort = pytest.importorskip("onnxruntime")
    from bionets.conversion import convert
    torch.manual_seed(0)
    model = convert(timm.create_model("resnet20_cifar", num_classes=10), activation="raa")[0].eval()
    for module in model.modules():
        if isinstance(module, RAA):
            randomized(module)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "raa.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"])
    out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["vector", "scalar", "matrix"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_raa_on_an_empty_batch(variant, fmt):
    """A batch of 0 maps gives an empty output and zero parameter gradients, in every layout."""
    raa = RAA(8, variant)
    x = torch.randn(0, 8, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    out = raa(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in raa.parameters())


@pytest.mark.parametrize("variant", ["vector", "matrix"])
def test_raa_computes_in_the_input_dtype_under_autocast(variant):
    """A float32 map under bf16 autocast on the PyTorch path (a strided slice: no kernel takes it) has
    its shift and dL/dv, dL/dc summed in float32, as the kernels do: autocast ran them in bf16 (1e-2
    off, dL/dc 13% with 200 features)."""
    torch.manual_seed(0)
    raa = randomized(RAA(200, variant, dim=-1))
    x = torch.randn(4, 6, 400)[..., :200].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = raa(x)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *raa.parameters()), g)
    want = torch.autograd.grad(direct(x, raa, -1), (x, *raa.parameters()), g)
    torch.testing.assert_close(out, direct(x, raa, -1), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    from bionets.layers.raa import raa_expression          # the plain expression (compiled models, torch.func) too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = raa_expression(x, raa.shift_params, variant, "gelu", -1, getattr(raa, "W", None))
    torch.testing.assert_close(plain, direct(x, raa, -1), rtol=1e-5, atol=1e-5)


def test_matrix_raa_keeps_the_input_dtype_against_parameters_of_another():
    """The matrix variant with float64 parameters returns a float32 input's dtype (c promoted it), and
    its plain expression (torch.func, compiled models) takes W in the input's dtype (it raised)."""
    from bionets.layers.raa import raa_expression
    for base in ("gelu", "relu"):
        raa = randomized(RAA(4, "matrix", base)).double()
        x = torch.randn(2, 4, 3, 3)
        assert raa(x).dtype == torch.float32
        out = torch.func.vmap(lambda t: raa(t.unsqueeze(0)))(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.squeeze(1), raa(x), rtol=1e-5, atol=1e-6)
        for dim, t in ((1, x), (-1, x.movedim(1, -1))):
            y = raa_expression(t.bfloat16(), raa.c, "matrix", base, dim, raa.W)
            assert y.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_torch_jit_trace_records_the_plain_expression():
    """torch.jit.trace of a model with RAA records RAA's plain expression (tensor operators that any
    TorchScript runtime has), not the operator of its own C++ kernels, and gives the same values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), randomized(RAA(8)), randomized(RAA(8, base="relu"))).eval()
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    traced = torch.jit.trace(model, x)
    assert "bionets_raa" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


def test_state_from_before_v_and_c_were_one_parameter_loads_into_vc():
    """A vector RAA's former separate v and c: a state dict loads (strict), model.init takes a
    checkpoint's weights, a whole module pickled then unpickles, each with vc = [v | c]; an lr_mult
    pattern written for v says what to write instead."""
    import pickle

    from bionets.config import load_config
    from bionets.engine.model import load_initial_weights
    torch.manual_seed(0)
    v, c = torch.randn(4), torch.randn(1)
    model = nn.Sequential(nn.Linear(4, 4), RAA(4, dim=-1))
    old = {**{f"0.{k}": t for k, t in model[0].state_dict().items()}, "1.v": v, "1.c": c}
    model.load_state_dict(dict(old))
    assert torch.equal(model[1].vc.detach(), torch.cat([v, c])) and torch.equal(model[1].v, v)
    fresh = nn.Sequential(nn.Linear(4, 4), RAA(4, dim=-1))
    load_initial_weights(fresh, dict(old), "old.pt", final=True)
    assert torch.equal(fresh[1].vc.detach(), torch.cat([v, c]))
    state = RAA(4).__getstate__()
    state["_parameters"] = {"c": nn.Parameter(c.clone()), "v": nn.Parameter(v.clone())}
    unpickled = pickle.loads(pickle.dumps(state))
    raa = RAA.__new__(RAA)
    raa.__setstate__(unpickled)
    assert list(raa._parameters) == ["vc"] and torch.equal(raa.vc.detach(), torch.cat([v, c]))
    torch.testing.assert_close(raa(torch.ones(2, 4)), model[1](torch.ones(2, 4)))
    with pytest.raises(BionetsError, match=r"write '\*\.vc'"):
        load_config(None, ["mechanisms={raa: {}}", "optim.lr_mult={'*.v': 0.02}"])
