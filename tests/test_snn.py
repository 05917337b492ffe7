"""Spiking neurons and models: LIF and IF against SPEC-STDS's equations step by step, state resets,
and every registered spiking model's forward and backward on a tiny input."""
import math
import warnings

import pytest
import timm
import torch
from spikingjelly.activation_based import neuron, surrogate

import bionets  # noqa: F401  (registers the models)
from bionets.engine.model import count_parameters, create_model
from bionets.errors import BionetsError
from bionets.layers.stds import apply_stds, export
from bionets.models.snn_cifar import if_kwargs, lif_node

SPIKING = {  # model -> tiny constructor options
    "snn_digits": dict(in_chans=1, T=2),
    "snn_cifar10": dict(in_chans=3, T=2, img_size=8),
    "sew_resnet18": dict(in_chans=3, T=2),
    "sew_resnet34": dict(in_chans=3, T=1),
    "sew_resnet50": dict(in_chans=3, T=1),
}
INPUT = {"snn_digits": (2, 1, 8, 8), "snn_cifar10": (2, 3, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")


def lif_formula(xs, tau=2.0):
    """H_t = V_{t-1} + (X_t - V_{t-1}) / tau; S_t = [H_t >= 1]; V_t = H_t (1 - S_t)."""
    v, out = 0.0, []
    for x in xs:
        h = v + (x - v) / tau
        s = 1.0 if h >= 1.0 else 0.0
        v = h * (1 - s)
        out.append((h, s, v))
    return out


def if_formula(xs):
    """H_t = V_{t-1} + X_t; S_t = [H_t >= 1]; V_t = H_t (1 - S_t)."""
    v, out = 0.0, []
    for x in xs:
        h = v + x
        s = 1.0 if h >= 1.0 else 0.0
        v = h * (1 - s)
        out.append((h, s, v))
    return out


def run_neuron(node, xs):
    node.store_v_seq = True
    x = torch.tensor(xs, dtype=torch.float64).view(-1, 1)
    spikes = node(x).view(-1).tolist()
    return spikes, node.v_seq.view(-1).tolist()


def test_lif_matches_the_equations_step_by_step():
    xs = [1.5, 0.8, 1.9, 0.2, 3.0, -0.4, 1.2]
    spikes, vs = run_neuron(lif_node(), xs)
    expected = lif_formula(xs)
    assert spikes == [s for _, s, _ in expected]
    assert vs == pytest.approx([v for _, _, v in expected], abs=1e-12)
    # by hand: V = 0.75, 0.775, (H = 1.3375: spike) 0, 0.1, (H = 1.55: spike) 0, -0.2, 0.5
    assert vs == pytest.approx([0.75, 0.775, 0.0, 0.1, 0.0, -0.2, 0.5], abs=1e-12)
    assert spikes == [0, 0, 1, 0, 1, 0, 0]


def test_if_matches_the_equations_step_by_step():
    xs = [0.4, 0.4, 0.4, 1.5, -0.3, 0.9]
    spikes, vs = run_neuron(neuron.IFNode(**if_kwargs()), xs)
    expected = if_formula(xs)
    assert spikes == [s for _, s, _ in expected] == [0, 0, 1, 1, 0, 0]
    assert vs == pytest.approx([v for _, _, v in expected], abs=1e-12)
    assert vs == pytest.approx([0.4, 0.8, 0.0, 0.0, -0.3, 0.6], abs=1e-12)


def test_surrogate_gradient_is_atan_with_alpha_2_and_the_reset_is_detached():
    node = lif_node()
    x = torch.tensor([[0.8], [0.5]], dtype=torch.float64, requires_grad=True)
    s = node(x)
    s[0].sum().backward(retain_graph=True)
    h1 = 0.4    # H_1 = X_1 / 2
    # g'(x) = (alpha / 2) / (1 + (pi / 2 * alpha * x)^2), alpha = 2
    atan = lambda u: (2.0 / 2) / (1 + (math.pi / 2 * 2.0 * u) ** 2)  # noqa: E731
    assert x.grad[0].item() == pytest.approx(atan(h1 - 1) / 2)
    # a spike at step 1 resets V_1 = H_1 (1 - S_1) with S_1 detached: dS_2/dX_1 passes only through H_1
    node.reset()
    x = torch.tensor([[3.0], [0.5]], dtype=torch.float64, requires_grad=True)
    s = node(x)
    s[1].sum().backward()
    assert s[0].item() == 1 and x.grad[0].item() == 0.0     # V_1 = H_1 * 0 and no path through S_1


@pytest.mark.parametrize("name", list(SPIKING))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    opts = SPIKING[name]
    model = timm.create_model(name, num_classes=10, **opts)
    x = 3 * torch.randn(*INPUT.get(name, (2, 3, 32, 32)))
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    (out - torch.nn.functional.one_hot(torch.tensor([1, 2]), 10)).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    stem = model.conv_stem if hasattr(model, "conv_stem") else model.conv1
    assert stem.weight.grad.abs().sum() > 0                  # through every spiking layer to the stem
    nodes = [m for m in model.modules() if isinstance(m, neuron.BaseNode)]
    surrogates = [n.surrogate_function for n in nodes]
    assert len({id(s) for s in surrogates}) == len(nodes)    # one surrogate instance per neuron
    assert all(isinstance(s, surrogate.ATan) and s.alpha == 2.0 for s in surrogates)
    assert all(n.v_threshold == 1.0 and n.v_reset == 0.0 and n.detach_reset and n.step_mode == "m" for n in nodes)
    assert all(isinstance(n.v, float) for n in nodes)         # state reset after the pass


@pytest.mark.parametrize("name", list(SPIKING))
def test_an_empty_batch_gives_an_empty_output(name):
    model = timm.create_model(name, num_classes=10, **SPIKING[name])
    shape = INPUT.get(name, (2, 3, 32, 32))
    out = model(torch.randn(0, *shape[1:]))
    out.sum().backward()
    assert out.shape == (0, 10)


@pytest.mark.parametrize("name", list(SPIKING))
def test_reset_classifier_as_timm_defines_it(name):
    """reset_classifier(n): a fresh classifier for n classes; 0 (or num_classes=0 at creation): the
    model returns its pre-logits features."""
    model = timm.create_model(name, num_classes=10, **SPIKING[name]).eval()
    x = torch.randn(*INPUT.get(name, (2, 3, 32, 32)))
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    assert timm.create_model(name, num_classes=0, **SPIKING[name]).eval()(x).shape == pre.shape


@pytest.mark.parametrize("cnf", ["ADD", "AND", "IAND"])
def test_sew_connect_functions_in_both_block_kinds(cnf):
    """g(S, A) with S the identity and A the residual branch: S + A, S * A, S * (1 - A) (IAND = S AND NOT A)."""
    expected = {"ADD": lambda s, a: s + a, "AND": lambda s, a: s * a, "IAND": lambda s, a: s * (1 - a)}[cnf]
    for name, last in (("sew_resnet18", "sn2"), ("sew_resnet50", "sn3")):
        model = timm.create_model(name, num_classes=5, T=1, cnf=cnf).eval()
        block = model.layer1[1]                  # no downsample: the identity is the input itself
        branch = []
        getattr(block, last).register_forward_hook(lambda m, i, o: branch.append(o))
        x = (torch.rand(2, 1, block.conv1.in_channels, 4, 4) < 0.5).float()
        with torch.no_grad():
            out = block(x)
        assert torch.equal(out, expected(x, branch[0])), name
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_state_is_reset_between_batches_and_in_eval():
    torch.manual_seed(0)
    model = timm.create_model("snn_digits", num_classes=10, T=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(4)                  # enough drive for spikes in every layer
        x = torch.randn(3, 1, 8, 8) * 3
        first = model(x)
        model(torch.randn(3, 1, 8, 8) * 3)       # a different batch in between
        again = model(x)
        assert first.abs().sum() > 0 and torch.equal(first, again)
        # forward_features and forward_head called alone start from rest too (they carried the state over)
        features = model.forward_features(x)
        assert torch.equal(model.forward_features(x), features)
        assert torch.equal(model.forward_head(features), model.forward_head(features))
        assert torch.equal(model.forward_head(features), first)
        # a neuron swapped in after the first forward is reset as well (SpikingJelly's reset_net cached
        # the neurons it found first: the new one kept its state from batch to batch)
        replaced = model.sn1
        model.sn1 = lif_node()
        assert torch.equal(model(x), model(x)) and replaced is not model.sn1


def test_spiking_models_refuse_single_step_mode_other_inputs_and_time_steps_set_later():
    """set_step_mode(model, 's') (which read [T, N, ...] as one step: 96% -> 10% on the digits, or a
    conv error in SEW), an input already over time or of another size, and a T set to 0 after
    construction: one line each. T may be a NumPy integer, img_size a pair."""
    import numpy as np
    from spikingjelly.activation_based import functional
    for name, shape in (("snn_digits", (2, 1, 8, 8)), ("sew_resnet18", (2, 3, 32, 32))):
        model = timm.create_model(name, num_classes=10).eval()
        x = torch.randn(shape)
        functional.set_step_mode(model, "s")
        with pytest.raises(BionetsError, match="is set to step_mode='s': set .*set_step_mode\\(model, 'm'\\)"):
            model(x)
        functional.set_step_mode(model, "m")
        with pytest.raises(BionetsError, match="it repeats them over its T time steps itself"):
            model(x.unsqueeze(0).repeat(4, 1, 1, 1, 1))
        model.T = 0
        with pytest.raises(BionetsError, match="T must be an integer >= 1"):
            model(x)
        model.T = np.int64(2)
        assert model(x).shape == (2, 10)
    with pytest.raises(BionetsError, match=r"takes images \[N, 1, 8, 8\]"):
        timm.create_model("snn_digits")(torch.randn(2, 1, 16, 16))
    assert timm.create_model("snn_digits", T=np.int64(3), img_size=(8, 8)).T == 3


def test_mse_onehot_takes_label_smoothing_as_mixup_does():
    """train.label_smoothing was dropped under loss: mse_onehot (it acted only through mixup's soft
    targets): the one-hot targets are smoothed the same way, 1 - s + s/K and s/K."""
    from bionets.engine.evaluate import task_loss
    rates, y = torch.rand(4, 5), torch.tensor([0, 3, 1, 4])
    want = torch.full((4, 5), 0.2 / 5)
    want[torch.arange(4), y] += 0.8
    torch.testing.assert_close(task_loss("mse_onehot", rates, y, 0.2), torch.nn.functional.mse_loss(rates, want))
    assert task_loss("mse_onehot", rates, y) == torch.nn.functional.mse_loss(rates, torch.eye(5)[y])


def test_direct_encoding_runs_the_stem_once():
    model = timm.create_model("sew_resnet18", num_classes=10, T=3).eval()
    calls = []
    model.conv1.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert calls == [(2, 3, 32, 32)] and feats.shape[:2] == (3, 2)


def test_stds_on_a_spiking_model_and_export():
    torch.manual_seed(0)
    model = timm.create_model("snn_digits", num_classes=10, T=2).eval()
    layers = apply_stds(model, "stmod", 0.05)
    assert layers == ["conv_stem", "features.0.0", "features.3.0", "fc1", "fc2"]
    x = torch.randn(4, 1, 8, 8) * 3
    with torch.no_grad():
        y1, y2 = model(x), model(x)
        export(model)
        y3 = model(x)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)


def test_spec_parameter_count_and_bad_options():
    # convs 3*256*9 + 5*256*256*9, 1x1 convs 16384*2048 + 2048*100 (no bias), 6 BatchNorms
    assert count_parameters("snn_cifar10") == 6912 + 5 * 589824 + 16384 * 2048 + 2048 * 100 + 6 * 512
    assert count_parameters("sew_resnet18") == 11689512                # as torchvision's ResNet-18
    for bad in (dict(T=0), dict(T=-2), dict(T=True)):      # True passed as an int and crashed later
        for name in ("snn_digits", "snn_cifar10", "sew_resnet18"):
            with pytest.raises(BionetsError, match="T must be"):
                create_model(name, 10, 3, bad)
    with pytest.raises(BionetsError, match="connect function 'OR'"):
        create_model("sew_resnet18", 10, 3, {"cnf": "OR"})
    with pytest.raises(BionetsError, match="divisible"):
        create_model("snn_cifar10", 10, 3, {"img_size": 30})
    for rate in (2.0, -0.5):        # (SpikingJelly's Dropout asserted it, with no message)
        with pytest.raises(BionetsError, match=rf"drop_rate={rate} must lie in \[0, 1\)"):
            create_model("snn_digits", 10, 1, {"drop_rate": rate})
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # (a 0-class Linear warned of zero-element tensors)
        assert isinstance(create_model("sew_resnet18", 0, 3, {"T": 1}).fc, torch.nn.Identity)
