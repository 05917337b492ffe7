"""STDS's soft-threshold reparameterization against its equations, computed directly in float64."""
import math
from copy import deepcopy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bionets.config import validate_section
from bionets.engine.hooks import Progress
from bionets.errors import BionetsError
from bionets.layers.stds import (SoftThreshold, apply_stds, export, set_threshold, soft_threshold, sparsity,
                                 threshold_at)
from bionets.mechanisms import get_mechanism, parse_mechanisms


pytestmark = pytest.mark.usefixtures("one_thread")


def formula(theta, d):
    """w = sign(theta) * max(|theta| - D, 0), element by element in float64."""
    return torch.tensor([math.copysign(max(abs(t) - d, 0.0), t) if t != 0 else 0.0 for t in theta.tolist()],
                        dtype=torch.float64)


def theta_grid():
    return torch.tensor([-2.0, -0.75, -0.5, -0.3, -1e-9, 0.0, 1e-9, 0.2, 0.5, 0.5000001, 0.9, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("fn", ["stmod", "st"])
@pytest.mark.parametrize("d", [0.0, 0.5, 1.3])
def test_soft_threshold_matches_formula(fn, d):
    theta = torch.cat([theta_grid(), torch.randn(50, dtype=torch.float64)])
    w = soft_threshold(theta, torch.tensor(d, dtype=torch.float64), fn)
    assert torch.equal(w, formula(theta, d))               # exact, zeros included
    assert int((w == 0).sum()) == int((theta.abs() <= d).sum())
    w32 = soft_threshold(theta.float(), d, fn)
    assert torch.allclose(w32.double(), formula(theta.float().double(), d), atol=1e-6)


def test_a_negative_threshold_given_to_soft_threshold_is_one_line():
    """torch's check named a 'lambda' the caller never gave."""
    with pytest.raises(BionetsError, match="STDS threshold D must be a finite number >= 0"):
        soft_threshold(torch.randn(3), -1.0)


def test_identity_is_theta():
    theta = torch.randn(7, dtype=torch.float64)
    assert soft_threshold(theta, 5.0, "identity") is theta


def test_straight_through_and_true_gradients():
    d = 0.5
    for fn, expected in (("stmod", torch.ones_like), ("st", lambda t: (t.abs() > d).double())):
        theta = theta_grid().requires_grad_()
        g = torch.linspace(-1, 2, len(theta), dtype=torch.float64)
        (soft_threshold(theta, torch.tensor(d, dtype=torch.float64), fn) * g).sum().backward()
        assert torch.equal(theta.grad, g * expected(theta.detach())), fn


@pytest.mark.parametrize("kind", ["stmod", "st", "gradr"])
def test_compiled_and_exported_as_one_graph_with_the_same_gradients(kind):
    """Under torch.compile (fullgraph) and torch.export the reparameterizations are plain ops (the
    autograd functions would break the graph: a jvp, and D.item() on the CPU), with the same values
    and the same straight-through / true / Grad R gradients as eager."""
    from bionets.layers.gradr import apply_gradr
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    if kind == "gradr":
        apply_gradr(model)
    else:
        apply_stds(model, kind, 0.1)
    x = torch.randn(4, 3, 8, 8)
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for compiled, eager in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(compiled, eager)
    exported = torch.export.export(model.eval(), (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_gradcheck_where_the_gradient_is_the_derivative():
    d = torch.tensor(0.4, dtype=torch.float64)
    away = torch.tensor([-2.0, -0.9, -0.3, 0.1, 0.2, 0.7, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_threshold(t, d, "st"), (away,), eps=1e-6)
    outside = torch.tensor([-2.0, -0.9, 0.7, 1.5], dtype=torch.float64, requires_grad=True)   # |theta| > D
    assert torch.autograd.gradcheck(lambda t: soft_threshold(t, d, "stmod"), (outside,), eps=1e-6)
    # through a reparameterized layer: d(out)/d(input) and d(out)/d(theta) off the kinks
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    apply_stds(layer, "stmod", 0.05)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_regrowth_with_stmod_but_not_with_st():
    """A zero weight in the flat region |theta| <= D grows back when the gradient pushes theta out."""
    results = {}
    for fn in ("stmod", "st"):
        layer = nn.Linear(4, 1, bias=False).double()
        apply_stds(layer, fn, 0.5)
        with torch.no_grad():
            layer.parametrizations.weight.original.copy_(torch.tensor([[0.3, -0.2, 0.8, 0.1]]))
        assert layer.weight.tolist() == [[0.0, 0.0, pytest.approx(0.3), 0.0]]
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(3):   # loss = -sum(w): every dL/dw = -1, theta rises by 0.1 per step (where it flows)
            opt.zero_grad()
            (-layer(torch.ones(1, 4, dtype=torch.float64))).sum().backward()
            opt.step()
        results[fn] = layer.weight.detach()[0]
    assert results["stmod"][0] == pytest.approx(0.1)      # theta 0.3 -> 0.6 > D: the spine came back
    assert results["stmod"][1] == 0 and results["stmod"][3] == 0   # still inside the flat region
    assert results["st"][0] == 0 and results["st"][3] == 0           # true gradient 0 there: no regrowth
    assert results["st"][2] == pytest.approx(0.6)


def test_zero_initialized_layer_still_learns():
    """Straight through at theta = 0 too: a zero-initialized layer (e.g. a timm head) is not frozen."""
    layer = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(layer.weight)
    apply_stds(layer, "stmod", 0.1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        (-layer(torch.ones(1, 3))).sum().backward()
        opt.step()
    assert torch.allclose(layer.weight, torch.full((2, 3), 0.5))   # theta = 0.6 after 3 steps, w = 0.6 - 0.1


@pytest.mark.parametrize("schedule,values", [
    ("sine", (0.0, 1.5, 3.0)), ("linear", (0.0, 1.5, 3.0)), ("fixed", (3.0, 3.0, 3.0))])
def test_schedules_at_start_middle_end(schedule, values):
    n_total = 1000
    got = [threshold_at(schedule, 3.0, n, n_total) for n in (0, n_total // 2, n_total)]
    assert got == pytest.approx(list(values), abs=1e-12)
    assert threshold_at(schedule, 3.0, 2 * n_total, n_total) == pytest.approx(values[-1])   # capped at N


def test_schedules_follow_their_formulas_over_the_whole_run():
    """D_n = d_max * n / N (linear) and d_max * (1 - cos(pi n / N)) / 2 (sine) at every 37th step
    of N = 1000, not only where the two agree (0, N/2, N)."""
    for n in range(0, 1001, 37):
        assert threshold_at("linear", 3.0, n, 1000) == pytest.approx(3.0 * n / 1000, abs=1e-12)
        assert threshold_at("sine", 3.0, n, 1000) == pytest.approx(3.0 * (1 - math.cos(math.pi * n / 1000)) / 2,
                                                                    abs=1e-12)


def test_sine_is_slow_at_both_ends():
    quarter = threshold_at("sine", 1.0, 250, 1000)
    assert quarter == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert quarter < threshold_at("linear", 1.0, 250, 1000)
    assert threshold_at("sine", 1.0, 750, 1000) > threshold_at("linear", 1.0, 750, 1000)


def test_fixed_init_theta_and_first_weights():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3).double()
    w0 = layer.weight.detach().clone()
    apply_stds(layer, "stmod", 0.7)
    theta = layer.parametrizations.weight.original.detach()
    assert torch.equal(theta, torch.sign(w0) * (w0.abs() + 0.7))
    assert torch.allclose(layer.weight, w0, atol=1e-15)
    # through the mechanism: the fixed schedule starts at D_max, sine and linear at 0
    for schedule, d0 in (("fixed", 2.0), ("sine", 0.0), ("linear", 0.0)):
        model = nn.Sequential(nn.Linear(3, 2))
        w0 = model[0].weight.detach().clone()
        get_mechanism("stds").apply(model, parse_mechanisms({"stds": {"schedule": schedule, "d_max": 2.0}})["stds"])
        assert model[0].parametrizations.weight[0].d.item() == d0
        assert torch.allclose(model[0].weight, w0, atol=1e-6)


def hand_model(sparse_function="stmod"):
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    apply_stds(model, sparse_function, 0.5)
    with torch.no_grad():
        model[0].parametrizations.weight.original.copy_(torch.tensor([[0.1, 0.6, -0.5, -2.0], [0.0, 0.2, 0.3, 0.4]]))
        model[2].parametrizations.weight.original.copy_(torch.tensor([0.7, -0.1]).view(2, 1, 1, 1))
    return model


def test_sparsity_accounting_on_a_hand_made_model():
    s = sparsity(hand_model())
    assert s.zeros == {"0": 6, "2": 1} and s.sizes == {"0": 8, "2": 2}   # biases and BatchNorm do not count
    assert s.layer("0") == 0.75 and s.layer("2") == 0.5
    assert s.total == pytest.approx(7 / 10)                              # parameter-weighted, not 0.625
    assert s.metrics() == pytest.approx({"sparsity": 70.0, "sparsity/0": 75.0, "sparsity/2": 50.0})


def test_layer_selection_and_idempotence():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert apply_stds(model, include=["1.*"], exclude=["1.1"]) == ["1.0"]
    assert apply_stds(model, types=["conv"]) == ["0"]
    assert sorted(apply_stds(model)) == ["0", "1.0", "1.1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(apply_stds(model)) == ["0", "1.0", "1.1"]              # applying again changes nothing more
    assert len(model[0].parametrizations.weight) == 1
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_hook_attached_to_another_model_sets_its_d_and_misuse_is_one_line():
    """attach(other) after the schedule reached D_max: the next step sets the other model's D (it kept
    the value it had, since D did not change); a model without STDS, and a step that is no Progress,
    are one line each."""
    cfg = parse_mechanisms({"stds": {"schedule": "linear", "d_max": 1.0}})["stds"]
    first, second = hand_model(), hand_model()
    hook = get_mechanism("stds").apply(first, cfg).hooks[0]
    hook.on_step(Progress(step=100, total_steps=100, epoch=1, epochs=1))
    get_mechanism("stds").apply(second, cfg)
    hook.attach(second)
    hook.on_step(Progress(step=101, total_steps=100, epoch=1, epochs=1))
    assert second[0].parametrizations.weight[0].d.item() == 1.0 and "StdsConfig(" in repr(hook)
    with pytest.raises(BionetsError, match="has no STDS layer to drive"):
        hook.attach(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(BionetsError, match="takes a bionets.engine.hooks.Progress"):
        hook.on_step(5)


def test_hook_sets_d_every_step_and_reports():
    model = hand_model()
    cfg = parse_mechanisms({"stds": {"schedule": "linear", "d_max": 1.0}})["stds"]
    applied = get_mechanism("stds").apply(model, cfg)
    hook = applied.hooks[0]
    hook.attach(model)
    hook.on_step(Progress(step=50, total_steps=100, epoch=0, epochs=1))
    layers = (model[0].parametrizations.weight[0], model[2].parametrizations.weight[0])
    assert [p.d.item() for p in layers] == [0.5, 0.5]
    metrics = hook.epoch_metrics(model)
    assert metrics["stds_d"] == 0.5 and metrics["sparsity"] == pytest.approx(70.0)
    hook.on_step(Progress(step=100, total_steps=100, epoch=1, epochs=1))
    assert hook.epoch_metrics(model)["sparsity"] == pytest.approx(100 * 9 / 10)   # only theta = -2 passes D = 1
    dense = hand_model("identity")                                     # the dense baseline: D does nothing
    assert "stds_d" not in hook.epoch_metrics(dense) and "sparsity" in hook.epoch_metrics(dense)


def test_l1_prior_shrinks_theta_by_the_steps_rate_after_each_step():
    """The STDS code's L1 prior: theta <- sign(theta) max(|theta| - lr * l1, 0) after every optimizer
    step, at the rate of that step; none at the start-up call (lr 0), none without l1."""
    model = hand_model()
    cfg = parse_mechanisms({"stds": {"schedule": "fixed", "d_max": 0.5, "l1": 2.0}})["stds"]
    hook = get_mechanism("stds").apply(model, cfg).hooks[0]
    theta = model[0].parametrizations.weight.original
    start = theta.detach().clone()
    hook.on_step(Progress(step=0, total_steps=10, epoch=0, epochs=1))                # start-up: no step taken
    assert torch.equal(theta, start)
    hook.on_step(Progress(step=1, total_steps=10, epoch=0, epochs=1, lr=0.25))       # shrinks by 0.5
    torch.testing.assert_close(theta, start.sign() * (start.abs() - 0.5).clamp_min(0), rtol=0, atol=0)
    plain = get_mechanism("stds").apply(hand_model(), parse_mechanisms({"stds": {"schedule": "fixed"}})["stds"])
    kept = plain.model[0].parametrizations.weight.original.detach().clone()
    plain.hooks[0].on_step(Progress(step=1, total_steps=10, epoch=0, epochs=1, lr=0.25))
    assert torch.equal(plain.model[0].parametrizations.weight.original, kept)


def test_l1_prior_trains_sparser_on_digits(tmp_path):
    """Through bionets train: the same fixed-D run on the digits with the L1 prior ends sparser."""
    from bionets.engine.trainer import train
    from engine_helpers import fast_config
    runs = {l1: train(fast_config(tmp_path, "train.epochs=3", "optim.name=adamw", "optim.lr=0.01",
                                  "optim.weight_decay=0", f"mechanisms.stds={{schedule: fixed, d_max: 0.01, l1: {l1}}}",
                                  name=f"l1_{l1}"), quiet=True) for l1 in (0, 0.3)}
    # measured: 5.7% / 85.3% without, 37.3% / 76.7% with (chance: 10%)
    assert runs[0.3]["sparsity"] > runs[0]["sparsity"] + 20 and runs[0.3]["final_top1"] > 60


def test_only_the_final_threshold_competes_for_best_except_in_the_dense_baseline():
    """best.pt holds a model at the sparsity asked for (D = D_max); the dense baseline's D does
    nothing (w = theta), so every epoch of it competes."""
    def hook_for(sparse_function):
        cfg = parse_mechanisms({"stds": {"sparse_function": sparse_function, "schedule": "sine"}})["stds"]
        return get_mechanism("stds").apply(hand_model(sparse_function), cfg).hooks[0]
    sparse, dense = hook_for("stmod"), hook_for("identity")
    for step in (0, 50, 99):
        for hook in (sparse, dense):
            hook.on_step(Progress(step=step, total_steps=100, epoch=0, epochs=1))
        assert dense.may_be_best() and not sparse.may_be_best()
    sparse.on_step(Progress(step=100, total_steps=100, epoch=1, epochs=1))
    assert sparse.may_be_best()


def test_report_notes_a_d_max_above_nearly_every_weight():
    """convert(sparsity='stds') keeps the paper's CIFAR default D_max = 1, which prunes all of a timm
    model's weights (|w| ~ 0.05) by the schedule's end unless training grows them: the report says so."""
    def notes(**opts):
        model = nn.Sequential(nn.Linear(64, 64))
        nn.init.uniform_(model[0].weight, -0.1, 0.1)
        return get_mechanism("stds").apply(model, parse_mechanisms({"stds": opts})["stds"]).report.notes
    assert "d_max=1 is above |w| of 100.0% of these weights at the start" in notes()[0]
    assert notes(d_max=0.05) == [] and notes(schedule="fixed") == [] and notes(sparse_function="identity") == []


def test_plot_is_written(tmp_path):
    model = hand_model()
    hook = get_mechanism("stds").apply(model, parse_mechanisms({"stds": {}})["stds"]).hooks[0]
    history = [{"epoch": e, "test_top1": 50.0 + e, "train_top1": 40.0 + e, **hook.epoch_metrics(model)}
               for e in (1, 2, 3)]
    hook.on_train_end(tmp_path, history)
    png = tmp_path / "sparsity.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_export_bakes_effective_weights():
    model = hand_model()
    x = torch.randn(3, 4)
    expected_w = model[0].weight.detach().clone()
    y = model[0](x)
    export(model)
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    assert torch.equal(model[0].weight, expected_w) and int((model[0].weight == 0).sum()) == 6
    assert torch.equal(model[0](x), y)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias",
                                       "3.running_mean", "3.running_var", "3.num_batches_tracked"}


def test_exporting_a_deep_copy_leaves_the_model_as_it_was():
    """PyTorch's deep copy shares a parametrized module's class, and removing the parametrization
    deletes ``weight`` from that class: the original lost its weight before export took a class of
    its own."""
    model = hand_model()
    x = torch.randn(3, 4)
    y = model[0](x)
    copy = export(deepcopy(model))
    assert parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(copy[0])
    assert torch.equal(model[0](x), y) and torch.equal(copy[0](x), y)


def test_sparsity_of_an_exported_model_names_its_layers():
    model = hand_model()
    before = sparsity(model).metrics()
    export(model)
    with pytest.raises(BionetsError, match=r"no STDS or Grad R layer to count .*sparsity\(model, layers="):
        sparsity(model)
    assert sparsity(model, layers=["0", "2"]).metrics() == before
    assert sparsity(model, layers=["*"]).metrics() == before          # conv and linear layers, as STDS prunes
    for nothing in (["fc"], []):
        with pytest.raises(BionetsError, match=r"sparsity\(layers=...\) found no conv/linear layer"):
            sparsity(model, layers=nothing)


def test_set_threshold_and_state_dict_carry_d():
    model = hand_model()
    assert set_threshold(model, 0.25) == 2
    state = model.state_dict()
    assert state["0.parametrizations.weight.0.d"].item() == 0.25
    other = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    apply_stds(other)
    other.load_state_dict(state)
    assert torch.equal(other[0].weight, model[0].weight)


@pytest.mark.parametrize("section,needle", [
    ({"stds": {"sparse_function": "soft"}}, "sparse_function': Input should be 'stmod', 'st' or 'identity' (got 'soft')"),
    ({"stds": {"schedule": "cosine"}}, "schedule': Input should be 'sine', 'linear' or 'fixed' (got 'cosine')"),
    ({"stds": {"d_max": -1}}, "d_max': Input should be greater than or equal to 0 (got -1)"),
    ({"stds": {"d_max": float("inf")}}, "d_max': Input should be a finite number (got inf)"),
    ({"stds": {"types": ["attention"]}}, "types.0': Input should be 'conv' or 'linear' (got 'attention')"),
    ({"gradr": {"types": []}}, "types': List should have at least 1 item after validation, not 0 (got [])"),
    ({"stds": {"dmax": 1}}, "unknown config key 'mechanisms.stds.dmax' (did you mean: d_max?)"),
    ({"gradr": {"target_sparsity": 0.3}}, "target_sparsity': Input should be greater than or equal to 0.5 (got 0.3)"),
    ({"gradr": {"target_sparsity": 1.0}}, "target_sparsity': Input should be less than 1 (got 1.0)"),
])
def test_bad_config_is_one_line(section, needle):
    with pytest.raises(BionetsError) as err:
        parse_mechanisms(section)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_arguments_are_one_line():
    cases = [(lambda: SoftThreshold("soft"), "unknown sparse function 'soft' (did you mean: st, stmod?)"),
             (lambda: SoftThreshold("stmod", -0.1), "D must be a finite number >= 0 (in theta units, e.g. 1.0 with "
                                                    "Adam lr 1e-4), got -0.1"),
             (lambda: threshold_at("cosine", 1.0, 0, 10), "unknown STDS schedule 'cosine' (did you mean: sine, linear?)"),
             (lambda: apply_stds(nn.Sequential(nn.ReLU())), "no conv/linear layer of Sequential matching include=['*'] "
                                                            "exclude=[] (eligible: none)"),
             (lambda: apply_stds(nn.Linear(2, 2), include=["head*"]), "matching include=['head*'] exclude=[] "
                                                                      "(eligible: '' (the model itself))"),
             (lambda: set_threshold(nn.Linear(2, 2), -1.0), "D must be a finite number >= 0"),
             (lambda: apply_stds(nn.Linear(2, 2), include="x*"), "got the string 'x*': write ['x*']"),
             (lambda: apply_stds("model"), "apply_stds takes a torch.nn.Module, got str"),
             (lambda: apply_stds(nn.Linear(2, 2), types=[]), "types is empty, so no layer can be chosen: give 'conv' "
                                                             "or 'linear' or both"),
             (lambda: sparsity(5), "sparsity takes a torch.nn.Module, got int"),
             (lambda: export(5), "export takes a torch.nn.Module, got int")]
    for case, message in cases:
        with pytest.raises(BionetsError) as err:
            case()
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BionetsError, match="no conv/linear layer"):
        get_mechanism("stds").apply(nn.Sequential(nn.ReLU()), validate_section(get_mechanism("stds").config, {}))


def test_stds_trains_a_small_net_on_digits():
    """Loss falls, accuracy rises and sparsity grows on real data (sklearn's digits), a plain MLP."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    apply_stds(model, "stmod", 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps, losses = 150, []
    for n in range(steps):
        idx = torch.randint(0, 1500, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        set_threshold(model, threshold_at("sine", 0.1, n + 1, steps))
        losses.append(loss.item())
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    assert acc > 0.85
    assert sparsity(model).total > 0.3


# -- review fixes: settings of a layer made before, D's type and range, Progress, argument types ---------

def test_tied_weights_are_refused_in_one_line_and_a_module_held_twice_is_one_layer():
    """Two layers sharing one weight tensor: STDS's fixed start shifted the weights by D (applied once
    for each layer), and Grad R zeroed every negative weight (the second layer read the first's
    magnitudes as its weights). Refused, the model left as it was; the same Linear called twice is
    one layer, reparameterized once."""
    from bionets.layers.gradr import apply_gradr
    for apply, what in ((lambda m: apply_stds(m, "stmod", 0.1), "STDS"), (apply_gradr, "Grad R")):
        a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        b.weight = a.weight
        model = nn.Sequential(a, nn.ReLU(), b)
        with pytest.raises(BionetsError, match=f"layers '0' and '2' share one weight tensor \\(tied weights\\): {what} "
                                               r"cannot reparameterize it .* exclude them \(exclude=\['0', '2'\]\)"):
            apply(model)
        assert not parametrize.is_parametrized(a) and model[2].weight is a.weight
        with pytest.raises(BionetsError, match="layers '2' and '0' share one weight tensor"):
            apply_stds(model, "stmod", 0.1, include=["2"])        # (0 would read theta as its weight)
    a = nn.Linear(4, 4)
    w = a.weight.detach().clone()
    assert apply_stds(nn.Sequential(a, nn.ReLU(), a), "stmod", 0.1) == ["0"]
    torch.testing.assert_close(a.weight, w)


def test_a_fixed_start_on_low_precision_weights_is_noted():
    """theta = sign(w) (|w| + D) in bf16 rounds the weights (at D = 1, 5% of a ResNet layer's were
    exactly 0 at step 0) without a word; float32 weights, or the sine start (D = 0), need no note."""
    def report(dtype, schedule):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
        return str(get_mechanism("stds").apply(model, parse_mechanisms(
            {"stds": {"schedule": schedule, "d_max": 1.0}})["stds"]).report)
    assert ("the weights are bfloat16: theta = sign(w) (|w| + D) at the fixed start rounds them to steps of "
            "~0.0078 near D=1") in report(torch.bfloat16, "fixed")
    assert "steps of ~0.00098" in report(torch.float16, "fixed")
    assert "fixed start" not in report(torch.float32, "fixed") + report(torch.bfloat16, "sine")


def test_applying_stds_again_with_other_settings_is_one_line():
    """The names came back as if applied, but the layers kept their old function and D."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    apply_stds(model, "stmod", 0.1, include=["0"])
    for fn, d, differ in (("st", 0.1, "sparse_function 'stmod' -> 'st'"), ("stmod", 0.5, "d 0.1 -> 0.5"),
                          ("st", 0.5, "sparse_function 'stmod' -> 'st', d 0.1 -> 0.5")):
        with pytest.raises(BionetsError) as err:
            apply_stds(model, fn, d)
        assert str(err.value) == (f"the model's STDS layers (e.g. '0') were made with other settings ({differ}): "
                                  "apply STDS to a fresh model, or with the settings it had")
    assert not parametrize.is_parametrized(model[1])          # refused before any layer was changed
    p = model[0].parametrizations.weight[0]
    assert (p.sparse_function, p.d.item()) == ("stmod", pytest.approx(0.1))
    assert apply_stds(model, "stmod", 0.1) == ["1", "0"]      # the same settings: layer '0' as it was
    set_threshold(model, 0.25)
    assert apply_stds(model, "stmod", 0.25) == ["0", "1"]     # D as set now


def test_the_mechanism_and_apply_stds_agree_on_settings():
    """The mechanism's layers are compared by their schedule (D is its state); its hook drives the
    layers apply_stds made, if their sparse function is the mechanism's; one message for both."""
    cfg = parse_mechanisms({"stds": {"schedule": "linear", "d_max": 1.0}})["stds"]
    model = hand_model()                                        # stmod at D = 0.5, no schedule
    applied = get_mechanism("stds").apply(model, cfg)
    applied.hooks[0].on_step(Progress(step=30, total_steps=100, epoch=0, epochs=1))
    assert get_mechanism("stds").apply(model, cfg).report.changes == []          # D 0.3 now: still the same settings
    assert apply_stds(model, "stmod", 0.0) == ["0", "2"]                          # D is the schedule's
    for call, differ in ((lambda: apply_stds(model, "st", 0.3), "sparse_function 'stmod' -> 'st'"),
                         (lambda: get_mechanism("stds").apply(model, parse_mechanisms(
                             {"stds": {"schedule": "sine", "d_max": 1.0}})["stds"]), "schedule 'linear' -> 'sine'")):
        with pytest.raises(BionetsError) as err:
            call()
        assert str(err.value) == (f"the model's STDS layers (e.g. '0') were made with other settings ({differ}): "
                                  "apply STDS to a fresh model, or with the settings it had")
    with pytest.raises(BionetsError, match=r"other settings \(sparse_function 'st' -> 'stmod'\)"):
        get_mechanism("stds").apply(hand_model("st"), cfg)


@pytest.mark.parametrize("d", [float("inf"), float("nan"), -1.0, None, "0.5", True, torch.tensor([0.1, 0.2])])
def test_a_threshold_that_is_not_a_finite_number_at_least_0_is_one_line(d):
    """inf failed later with torch's 'lambda must be in range' (softshrink), None with a TypeError."""
    for call in (lambda: apply_stds(nn.Linear(2, 2), d=d), lambda: set_threshold(hand_model(), d),
                 lambda: soft_threshold(torch.randn(3), d), lambda: SoftThreshold("st", d)):
        with pytest.raises(BionetsError, match="STDS threshold D must be a finite number >= 0") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("d", [-1.0, float("inf"), float("nan")])
def test_a_bad_tensor_threshold_is_one_line_where_it_is_read(d):
    """A 0-d tensor D: checked where the CPU kernel reads it anyway (torch named a 'lambda')."""
    with pytest.raises(BionetsError, match=f"STDS threshold D must be a finite number >= 0 .*got {d}"):
        soft_threshold(torch.randn(3), torch.tensor(d))
    model = hand_model()
    with pytest.raises(BionetsError, match="STDS threshold D must be a finite number >= 0"):
        set_threshold(model, torch.tensor(d))


def test_a_good_tensor_threshold_is_taken():
    theta = theta_grid()
    assert torch.equal(soft_threshold(theta, torch.tensor(0.5)), formula(theta, 0.5))
    model = hand_model()
    assert set_threshold(model, torch.tensor(0.25)) == 2 and model[0].parametrizations.weight[0].d.item() == 0.25


def test_no_device_sync_per_forward_for_a_tensor_threshold(monkeypatch):
    """soft_threshold reads a tensor D's value only on the CPU (where its kernel needs it): off the
    CPU its check is of shape and dtype only (no .item(), which would sync a GPU every forward)."""
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self.device.type) or real_item(self))
    theta = torch.randn(5, device="meta")
    soft_threshold(theta, torch.tensor(0.5, device="meta"), "stmod")
    soft_threshold(theta, torch.tensor(0.5, device="meta"), "st")
    assert reads == []


def test_the_l1_prior_with_a_bad_rate_is_one_line():
    """A NaN or negative rate reached softshrink ('lambda must be in range'); Progress refuses it, and
    a product that overflows is refused by the hook."""
    cfg = parse_mechanisms({"stds": {"schedule": "fixed", "d_max": 0.5, "l1": 1e10}})["stds"]
    hook = get_mechanism("stds").apply(hand_model(), cfg).hooks[0]
    for lr in (float("nan"), -0.1):
        with pytest.raises(BionetsError, match=r"finite lr >= 0, got lr="):
            hook.on_step(Progress(step=1, total_steps=10, epoch=0, epochs=1, lr=lr))
    with pytest.raises(BionetsError, match=r"STDS l1 prior: the shrink lr \* l1 = 1e\+300 \* 10000000000.0 must be"):
        hook.on_step(Progress(step=1, total_steps=10, epoch=0, epochs=1, lr=1e300))


@pytest.mark.parametrize("args, bad", [
    ((-3, 10, 0, 1), "step=-3"), ((5, float("nan"), 0, 1), "total_steps=nan"), (("5", 10, 0, 1), "step='5'"),
    ((5, 10, -1, 1), "epoch=-1"), ((5, 10, 0, 1.5), "epochs=1.5"), ((True, 10, 0, 1), "step=True"),
    ((5, 10, 0, 1, float("nan")), "lr=nan"), ((5, 10, 0, 1, -1e-3), "lr=-0.001"),
    ((5, 10, 0, 1, float("inf")), "lr=inf"), ((5, 10, 0, 1, "1e-3"), "lr='1e-3'")])
def test_progress_is_validated(args, bad):
    """Progress(-3, 10, 0, 1) gave a positive D (the sine schedule is symmetric), a NaN total jumped
    to d_max, a string step failed in the schedule with a TypeError."""
    with pytest.raises(BionetsError) as err:
        Progress(*args)
    assert str(err.value) == ("Progress needs whole numbers >= 0 for step, total_steps, epoch and epochs and a finite "
                              f"lr >= 0, got {bad}")


def test_progress_takes_numpy_and_tensor_numbers():
    import numpy as np
    p = Progress(np.int64(3), 10, 0, 1, torch.tensor(0.5, dtype=torch.float64))
    assert (p.step, p.lr) == (3, 0.5) and type(p.step) is int and type(p.lr) is float
    assert Progress(0, 0, 0, 0) == Progress(0, 0, 0, 0, 0.0)


def test_threshold_at_refuses_a_negative_step_or_bad_d_max():
    with pytest.raises(BionetsError, match="STDS schedule step must be a whole number >= 0, got -3"):
        threshold_at("sine", 1.0, -3, 10)
    with pytest.raises(BionetsError, match="STDS d_max must be a finite number >= 0"):
        threshold_at("sine", float("inf"), 0, 10)


def test_bad_argument_types_are_one_line():
    """set_threshold('m'), copy_state(m, None): AttributeError; include=[0]: fnmatch's TypeError."""
    model = hand_model()
    hook = get_mechanism("stds").apply(model, parse_mechanisms({"stds": {}})["stds"]).hooks[0]
    cases = [(lambda: set_threshold("m", 0.1), "set_threshold takes a torch.nn.Module, got str"),
             (lambda: hook.copy_state(model, None), "StdsHook.copy_state(model, copy) takes a torch.nn.Module, got "
                                                    "NoneType"),
             (lambda: hook.attach("m"), "StdsHook.attach takes a torch.nn.Module, got str"),
             (lambda: apply_stds(nn.Linear(2, 2), include=[0]), "include takes names or glob patterns as strings, "
                                                                "got 0 (int) in [0]: write ['0']"),
             (lambda: apply_stds(nn.Linear(2, 2), exclude=None), "exclude takes a list of names or glob patterns, "
                                                                 "got NoneType None"),
             (lambda: apply_stds(nn.Linear(2, 2), types=[0]), "types takes names or glob patterns as strings"),
             (lambda: apply_stds(nn.Linear(2, 2), sparse_function=None), "unknown sparse function 'None'"),
             (lambda: threshold_at(None, 1.0, 0, 10), "unknown STDS schedule 'None'")]
    for case, message in cases:
        with pytest.raises(BionetsError) as err:
            case()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
