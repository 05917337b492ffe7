"""torch.func transforms (grad, vmap: per-sample gradients, functional MAML) and forward-mode AD over
every mechanism: inside them the layers with fused kernels use their plain expressions, and the
STDS / Grad R functions are in the setup_context form that the transforms need, with a jvp. Each
against plain autograd."""
import pytest
import timm
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap

import bionets
from bionets.layers.gradr import apply_gradr
from bionets.layers.map_norm import MapLayerNorm
from bionets.layers.quadratic import QuadraticChannel
from bionets.layers.raa import RAA
from bionets.layers.stds import apply_stds


def _sparse(apply, *args):
    """A small conv net with ``apply`` (apply_stds / apply_gradr) on every layer, in place."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    apply(net, *args)
    return net


MODULES = {
    "raa_vector": lambda: RAA(8),
    "raa_relu": lambda: RAA(8, base="relu"),
    "raa_matrix": lambda: RAA(8, "matrix"),
    "quadratic": lambda: QuadraticChannel(8, 5),
    "map_norm": lambda: MapLayerNorm((3, 3)),
    "stds_stmod": lambda: _sparse(apply_stds, "stmod", 0.05),
    "stds_st": lambda: _sparse(apply_stds, "st", 0.05),
    "gradr": lambda: _sparse(apply_gradr),
}


def module_input_params(name):
    """MODULES[name] with random parameters, a channels_last input (the layout of the C++ kernels)
    and its parameters as a detached dict."""
    torch.manual_seed(0)
    module = MODULES[name]()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    shape = (4, 3, 8, 8) if name.startswith(("stds", "gradr")) else (4, 8, 3, 3)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    return module, x, {k: v.detach() for k, v in module.named_parameters()}


@pytest.mark.parametrize("name", list(MODULES))
def test_grad_and_per_sample_grads_match_autograd(name):
    module, x, params = module_input_params(name)
    want = torch.autograd.grad(module(x).square().sum(), list(module.parameters()))

    got = grad(lambda p: functional_call(module, p, (x,)).square().sum())(params)      # x captured, not passed
    per_sample = vmap(grad(lambda p, xb: functional_call(module, p, (xb.unsqueeze(0),)).square().sum()),
                      in_dims=(None, 0))(params, x)
    for key, w in zip(params, want):
        torch.testing.assert_close(got[key], w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(per_sample[key].sum(0), w, rtol=1e-4, atol=1e-4)


def test_per_sample_gradients_of_a_dit_resnet_with_raa():
    """A whole model (eval mode: BatchNorm's batch statistics have no per-sample meaning): each
    sample's gradient from vmap(grad) equals autograd's on that sample alone."""
    torch.manual_seed(0)
    model = timm.create_model("dit_resnet20").eval().to(memory_format=torch.channels_last)
    bionets.convert(model, activation="raa")
    with torch.no_grad():
        model.layer2[0].quad.weight.normal_(std=0.05)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 7])

    def loss(p, xb, yb):
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yb.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        want = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                   list(model.parameters()))
        for key, w in zip(params, want):
            assert ((per_sample[key][i] - w).norm() / w.norm().clamp_min(1e-12)).item() < 1e-3, key


@pytest.mark.parametrize("name", list(MODULES))
def test_forward_mode_derivatives_match_reverse_mode(name):
    """Dual tensors (``torch.autograd.forward_ad``) and ``torch.func.jvp``, with respect to the input
    and to every parameter at once: ``<g, J t>`` from forward mode equals ``<J^T g, t>`` from
    backward (for STDS / Grad R the surrogate derivative both ways)."""
    module, x, params = module_input_params(name)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    x_t = torch.randn_like(x)

    x_r = x.clone().requires_grad_()
    out = module(x_r)
    g = torch.randn_like(out)
    back = torch.autograd.grad(out, [x_r, *module.parameters()], g)
    want = (back[0] * x_t).sum() + sum((b * tangents[k]).sum() for k, b in zip(params, back[1:]))

    _, func_t = jvp(lambda p, xi: functional_call(module, p, (xi,)), (params, x), (tangents, x_t))
    with forward_ad.dual_level():
        duals = {k: forward_ad.make_dual(v, tangents[k]) for k, v in params.items()}
        dual_t = forward_ad.unpack_dual(functional_call(module, duals, (forward_ad.make_dual(x, x_t),))).tangent
    for tangent in (func_t, dual_t):
        torch.testing.assert_close((g * tangent).sum(), want, rtol=1e-4, atol=1e-4)


def test_arr_loss_under_grad_is_one_line_unless_it_leaves_the_memory():
    """ARR's loss under torch.func.grad: without updating the class memory (update=False) it gives the
    gradient plain autograd gives; updating it (a buffer the transform does not own) is one line
    naming update=False, not PyTorch's error about mutating a captured tensor."""
    from bionets.errors import BionetsError
    from bionets.layers.arr import ArrMemory, arr_loss
    torch.manual_seed(0)
    memory, y, r = ArrMemory(1, 3, 4), torch.tensor([0, 1, 0, 2, 1, 0]), torch.randn(1, 6, 4)
    arr_loss(memory, r, y, weight=1.0, momentum=0.1)              # the classes seen: non-zero differences
    with pytest.raises(BionetsError, match="cannot update the class memory.*update=False"):
        grad(lambda a: arr_loss(memory, a, y, weight=1.0, momentum=0.1))(r)
    got = grad(lambda a: arr_loss(memory, a, y, weight=1.0, momentum=0.1, update=False))(r)
    leaf = r.clone().requires_grad_()
    arr_loss(memory, leaf, y, weight=1.0, momentum=0.1, update=False).backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, leaf.grad)
