"""Grad R (Gradient Rewiring) against its update rule computed directly in float64."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bionets.engine.optim import OptimConfig, create_optimizer
from bionets.errors import BionetsError
from bionets.layers.gradr import SignedStrength, apply_gradr, prior_centre, strengths
from bionets.mechanisms.stds import create_gradr
from bionets.layers.stds import apply_stds, sparsity
from bionets.mechanisms import get_mechanism, parse_mechanisms


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prior_centre():
    assert prior_centre(1e-3, 0.95) == pytest.approx(math.log(0.1) / 1e-3)
    assert prior_centre(0.5, 0.5) == 0.0


def test_sign_strength_and_the_ungated_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3).double()
    w0 = layer.weight.detach().clone()
    apply_gradr(layer)
    theta = layer.parametrizations.weight.original
    assert torch.equal(theta, w0.abs()) and torch.equal(layer.weight, w0)
    with torch.no_grad():
        theta[0, :3] = -0.1                      # pruned: w = 0, yet its gradient flows (the gate is ignored)
    s = torch.sign(w0)
    w = layer.weight
    assert torch.equal(w, s * theta.detach().clamp(min=0))
    g = torch.randn_like(w0)
    (w * g).sum().backward()
    assert torch.equal(theta.grad, s * g)


def adam_formula(theta, grads, s, lr, alpha, mu, betas=(0.9, 0.999), eps=1e-8):
    """theta <- theta - lr s m_hat / (sqrt(v_hat) + eps) - lr alpha sign(theta - mu), moments of g = dL/dw."""
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        theta = theta - lr * s * m_hat / (v_hat.sqrt() + eps) - lr * alpha * torch.sign(theta - mu)
    return theta


def test_steps_match_the_update_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    apply_gradr(model, alpha=0.3, target_sparsity=0.6, include=["0"])
    cfg = OptimConfig(name="gradr", lr=0.01, weight_decay=0.0)
    opt = create_gradr(model, cfg)
    theta = model[0].parametrizations.weight.original
    s = model[0].parametrizations.weight[0].s
    mu = prior_centre(0.3, 0.6)
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if "parametrizations" not in n}
    ref = torch.optim.Adam([p.detach().clone().requires_grad_() for p in plain.values()], lr=0.01)
    theta0, grads_w = theta.detach().clone(), []
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        with parametrize.cached():   # the forward pass uses this very w, so w.grad = dL/dw
            w = model[0].weight
            w.retain_grad()
            model(x).pow(2).sum().backward()
        grads_w.append(w.grad.detach().clone())
        ref_grads = [p.grad for n, p in model.named_parameters() if "parametrizations" not in n]
        for p, g in zip(ref.param_groups[0]["params"], ref_grads):
            p.grad = g.clone()
        opt.step()
        ref.step()
    assert torch.allclose(theta, adam_formula(theta0, grads_w, s, 0.01, 0.3, mu), atol=1e-12)
    # BatchNorm, biases and the unpruned layer: plain Adam
    for (name, p), q in zip([(n, p) for n, p in model.named_parameters() if "parametrizations" not in n],
                            ref.param_groups[0]["params"]):
        assert torch.allclose(p, q, atol=1e-12), name


def test_factory_through_the_engine_and_state_dict():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    get_mechanism("gradr").apply(model, parse_mechanisms({"gradr": {"alpha": 1e-3, "target_sparsity": 0.9}})["gradr"])
    opt = create_optimizer(model, OptimConfig(name="gradr", lr=1e-4, weight_decay=0.0))
    prior = [g for g in opt.param_groups if g.get("alpha")]
    assert len(prior) == 1 and len(prior[0]["params"]) == 2
    assert prior[0]["mu"] == pytest.approx(math.log(0.2) / 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.state_dict()["param_groups"][0]["alpha"] == 1e-3
    assert [n for n, _, _ in strengths(model)] == ["0.parametrizations.weight.original",
                                                     "3.parametrizations.weight.original"]


def test_errors():
    with pytest.raises(BionetsError, match=r"trains Grad R strengths, but the model has none: add 'mechanisms: "
                                           r"\{gradr: "):
        create_gradr(nn.Linear(2, 2), OptimConfig(name="gradr"))
    for p in (0.3, 1.0):
        with pytest.raises(BionetsError, match=r"\[0.5, 1\)"):
            apply_gradr(nn.Linear(2, 2), target_sparsity=p)
    with pytest.raises(BionetsError, match=r"alpha must be a finite number > 0 \(default 1e-3\), got 0.0"):
        SignedStrength(torch.ones(2), alpha=0.0)
    layer = nn.Linear(2, 2)
    apply_stds(layer)
    with pytest.raises(BionetsError, match="not both"):
        apply_gradr(layer)


def test_gradr_trains_and_prunes_on_digits():
    """Loss falls and the prior prunes: a plain MLP on sklearn's digits with a strong prior."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    apply_gradr(model, alpha=0.2, target_sparsity=0.95)
    opt = create_gradr(model, OptimConfig(name="gradr", lr=3e-3, weight_decay=0.0))
    losses = []
    for _ in range(150):
        idx = torch.randint(0, 1500, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    assert acc > 0.8
    assert sparsity(model).total > 0.4   # the prior's steady pull (lr * alpha per step) prunes


def test_exact_zeros_get_a_fixed_sign_and_learn():
    """sign(0) = 0 froze a zero-initialized layer for good (dL/dtheta = s * g = 0): exact zeros get
    +1 or -1, evenly, from a generator seeded with 0 (the same signs whatever the global seed)."""
    signs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        layer = nn.Linear(40, 50, bias=False)
        nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.weight[0, :3] = torch.tensor([0.5, -0.5, 0.0])
        apply_gradr(layer)
        s = layer.parametrizations.weight[0].s
        signs.append(s.clone())
        assert s[0, 0] == 1 and s[0, 1] == -1                    # nonzero weights keep sign(w_init)
        assert set(s.unique().tolist()) == {-1.0, 1.0}
        assert 0.4 < (s == 1).float().mean() < 0.6               # excitatory and inhibitory alike
        assert torch.equal(layer.weight[1:], torch.zeros(49, 40))   # the effective weights are unchanged
    assert torch.equal(signs[0], signs[1])
    layer = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(layer.weight)
    apply_gradr(layer)
    opt = create_gradr(layer, OptimConfig(name="gradr", lr=0.1, weight_decay=0.0))
    for _ in range(3):
        opt.zero_grad()
        layer(torch.ones(1, 3)).sum().backward()               # dL/dw = 1: inhibitory synapses grow
        opt.step()
    s = layer.parametrizations.weight[0].s
    assert (layer.weight != 0).any() and torch.equal(layer.weight != 0, s < 0)


def test_alpha_and_target_sparsity_must_be_finite_numbers():
    """alpha=inf pruned every weight after one step (theta -> -inf), silently."""
    for alpha in (float("inf"), float("nan"), -1.0, "1e-3", None):
        with pytest.raises(BionetsError, match=r"alpha must be a finite number > 0 \(default 1e-3\), got "):
            apply_gradr(nn.Linear(2, 2), alpha=alpha)
    for p in (float("nan"), None):
        with pytest.raises(BionetsError, match=r"target sparsity p must be in \[0.5, 1\)"):
            apply_gradr(nn.Linear(2, 2), target_sparsity=p)


def test_applying_gradr_again_with_other_settings_is_one_line():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    apply_gradr(model, alpha=1e-3, include=["0"])
    with pytest.raises(BionetsError) as err:
        apply_gradr(model, alpha=1e-2, target_sparsity=0.9)
    assert str(err.value) == ("the model's Grad R layers (e.g. '0') were made with other settings (alpha 0.001 -> "
                              "0.01, target_sparsity 0.95 -> 0.9): apply Grad R to a fresh model, or with the "
                              "settings it had")
    assert not parametrize.is_parametrized(model[1]) and model[0].parametrizations.weight[0].alpha == 1e-3
    assert apply_gradr(model, alpha=1e-3) == ["1", "0"]
    cfg = parse_mechanisms({"gradr": {"alpha": 0.1}})["gradr"]
    with pytest.raises(BionetsError, match=r"Grad R layers \(e.g. '0'\) were made with other settings \(alpha 0.001"):
        get_mechanism("gradr").apply(model, cfg)


def test_bad_argument_types_are_one_line():
    model = nn.Linear(2, 2)
    apply_gradr(model)
    for call, message in ((lambda: create_gradr(model, {"lr": 1e-3}), "create_gradr takes an OptimConfig"),
                          (lambda: create_gradr(model, None), "(name='gradr', lr=1e-3)), got NoneType"),
                          (lambda: create_gradr("m", OptimConfig(name="gradr")),
                           "create_gradr takes a torch.nn.Module, got str"),
                          (lambda: apply_gradr("m"), "apply_gradr takes a torch.nn.Module, got str"),
                          (lambda: apply_gradr(nn.Linear(2, 2), include=[0]),
                           "include takes names or glob patterns as strings")):
        with pytest.raises(BionetsError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
