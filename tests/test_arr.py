"""ARR: the loss on a hand-made batch (both forms), buffer updates, state, DDP, eval, CLI."""
import os
import pickle
import socket
import types

import pytest
import timm
import torch
import torch.multiprocessing as mp

from bionets.cli import main
from bionets.config import load_config
from bionets.errors import BionetsError
from bionets.layers.arr import ArrMemory, arr_loss, class_tokens, per_sample, sequential_means
from bionets.mechanisms import apply_mechanisms, parse_mechanisms
from compile_helpers import own_cpu_kernels


def loop_means(m0, r, y, a, each="after"):
    """The reference code's per-sample loop: the class mean read right before or right after each
    sample's update."""
    m, seen = m0.clone(), []
    for ri, yi in zip(r, y):
        if each == "before":
            seen.append(m[yi].clone())
        m[yi] = (1 - a) * m[yi] + a * ri
        if each == "after":
            seen.append(m[yi].clone())
    return torch.stack(seen), m


def test_sequential_means_match_the_loop():
    torch.manual_seed(0)
    m0, r, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 4, (20,))
    for each in ("after", "before"):
        means, final = sequential_means(m0, r, y, 0.1, each=each)
        ref_means, ref_final = loop_means(m0, r, y, 0.1, each)
        torch.testing.assert_close(means, ref_means)
        torch.testing.assert_close(final, ref_final)
        odd, _ = sequential_means(m0, r, y, 0.1, each=each, rows=slice(1, None, 3))    # some samples only
        torch.testing.assert_close(odd, ref_means[1::3])


def test_sequential_means_of_several_layers_at_once_match_the_loop_per_layer():
    torch.manual_seed(1)
    m0, r, y = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 16, 2, dtype=torch.float64), torch.randint(0, 4, (16,))
    after, final = sequential_means(m0, r, y, 0.3)                  # class 4 is absent: its mean stays
    for j in range(3):
        ref_after, ref_final = loop_means(m0[j], r[j], y, 0.3)
        torch.testing.assert_close(after[j], ref_after)
        torch.testing.assert_close(final[j], ref_final)


def test_loss_on_a_hand_made_batch():
    mem = ArrMemory(1, 2, 2)
    mem.mean[0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mem.seen[0] = True
    r = torch.tensor([[2.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    # paper: against each class mean just before the sample's own update: (1,1), (0,0), then class 0's
    # mean after the first sample, (1.5,1): |(1,0)| + |(0,2)| + |(-.5,0)| -> mean over 6 elements = 3.5/6
    loss = arr_loss(mem, [r], y, weight=2.0, momentum=0.5, form="paper")
    assert loss.item() == pytest.approx(2.0 * 3.5 / 6)
    # the update: class 0 sees (2,1) then (1,1): (1,1) -> (1.5,1) -> (1.25,1); class 1 -> (0,1)
    torch.testing.assert_close(mem.mean[0], torch.tensor([[1.25, 1.0], [0.0, 1.0]]))
    # code form: against the mean just after each sample's own update
    mem.mean[0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = arr_loss(mem, [r], y, weight=1.0, momentum=0.5, form="code")
    # means after: (1.5,1), (0,1), (1.25,1) -> |(.5,0)| + |(0,1)| + |(-.25,0)| = 1.75 over 6
    assert loss.item() == pytest.approx(1.75 / 6)


def test_first_response_initializes_and_gradient_flows_to_responses_only():
    mem = ArrMemory(1, 3, 2)
    r = torch.tensor([[1.0, 2.0], [3.0, 2.0]], requires_grad=True)
    loss = arr_loss(mem, [r], torch.tensor([2, 2]), weight=1.0, momentum=0.1)
    assert mem.seen[0].tolist() == [False, False, True]
    torch.testing.assert_close(mem.mean[0, 2], torch.tensor([1.2, 2.0]))      # r0, then 0.9 r0 + 0.1 r1
    assert loss.item() == pytest.approx(2 / 4)                                # |r1 - r0| = (2, 0) over 4
    loss.backward()
    torch.testing.assert_close(r.grad, torch.tensor([[0.0, 0.0], [0.25, 0.0]]))   # sign(r - t) / 4; r0 is its own mean
    assert not mem.mean.requires_grad


def loop_loss(mean, seen, r, y, a, weight, form):
    """ARR's loss, updated memory and differences r - t (each response less its target) by the
    per-sample loop, in float64, for r [J, N, D]."""
    mean, seen, diff = mean.double().clone(), seen.clone(), torch.zeros(r.shape, dtype=torch.float64)
    for j in range(r.shape[0]):
        for i, (ri, k) in enumerate(zip(r[j].double(), y.tolist())):
            before = mean[j, k].clone() if seen[j, k] else ri
            mean[j, k] = (1 - a) * before + a * ri if seen[j, k] else ri
            seen[j, k] = 1
            diff[j, i] = ri - (mean[j, k] if form == "code" else before)
    return weight * diff.abs().sum() / r.numel(), mean, seen, diff


def assert_sign_gradient(grad: torch.Tensor, diff: torch.Tensor, scale: float, ties: float = 1e-4) -> None:
    """``grad`` is ``scale * sign(diff)`` (diff: r - t in float64), in grad's dtype; where r is
    within ``ties`` of its target (a class's first response, its own mean up to rounding) any of
    -scale, 0 and +scale."""
    step = torch.tensor(scale, dtype=grad.dtype).double()
    want = (step * diff.sign()).to(grad.dtype)
    clear = diff.abs() > ties
    assert torch.equal(grad[clear], want[clear]), (grad[clear] - want[clear]).abs().max()
    assert torch.isin(grad[~clear].double().abs(), torch.stack([step * 0, step])).all()


def test_code_form_gives_a_new_class_first_sample_no_gradient_on_every_path(monkeypatch):
    """In the code form a class's first sample is its own mean: the PyTorch operators (compiling, DDP,
    torch.func, float64) computed it as (1-a) r + a r, a rounding off r, whose sign gave that sample a
    full-size gradient where the C++ operator gives none: both paths now give the same gradients."""
    from bionets.layers import arr
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    for _ in range(5):
        base = torch.randn(2, 6, 4)
        grads = []
        for own in (True, False):
            r = base.clone().requires_grad_()
            with monkeypatch.context() as m:
                if not own:
                    m.setattr(arr, "_own_operator", lambda *args: None)
                arr_loss(ArrMemory(2, 3, 4), r, y, weight=1.0, momentum=0.1, form="code").backward()
            grads.append(r.grad)
        assert torch.equal(grads[0], grads[1]) and not grads[1][:, [0, 1, 3]].any()


@pytest.mark.parametrize("form", ["paper", "code"])
def test_a_double_model_computes_arr_in_float64(form):
    """A float64 memory (model.double()) with float64 responses: the loss and the class means equal the
    float64 loop to float64's rounding (computed in float32 they were 1e-6 off)."""
    torch.manual_seed(0)
    memory = ArrMemory(2, 4, 3).double()
    for _ in range(3):
        r, y = torch.randn(2, 10, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
        want, mean, seen, _ = loop_loss(memory.mean, memory.seen, r, y, 0.1, 2.0, form)
        loss = arr_loss(memory, list(r), y, weight=2.0, momentum=0.1, form=form)
        assert loss.dtype == torch.float64 and memory.mean.dtype == torch.float64
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(memory.mean, mean, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("form", ["paper", "code"])
def test_own_operator_matches_the_loop_and_the_pytorch_operators(form, layers, dtype, monkeypatch):
    """ARR's C++ operator (the class-mean scan and the loss in one call, autograd in C++) against the
    per-sample loop in float64 (loss, memory) and the PyTorch operators (loss, gradients, memory),
    over batches in which classes appear for the first time; bf16 responses are read without a cast."""
    from bionets.layers import arr
    own = own_cpu_kernels("arr_cpu")
    op, calls = own.arr_loss.default, []
    monkeypatch.setattr(own, "arr_loss", types.SimpleNamespace(default=lambda *a: calls.append(a[0].dtype) or op(*a)))
    torch.manual_seed(0)
    memory = ArrMemory(layers, 6, 5)
    for step in range(3):
        y = torch.randint(0, 2 + 2 * step, (20,))
        base = [torch.randn(20, 5).to(dtype) for _ in range(layers)]
        reference = ArrMemory(layers, 6, 5)
        reference.load_state_dict(memory.state_dict())
        want, mean, seen, diff = loop_loss(memory.mean, memory.seen, torch.stack(base), y, 0.2, 1.5, form)
        r = [t.clone().requires_grad_() for t in base]
        loss = arr_loss(memory, r, y, weight=1.5, momentum=0.2, form=form)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(memory.mean, mean.float(), rtol=1e-5, atol=1e-6)
        assert torch.equal(memory.seen, seen)
        with monkeypatch.context() as m:
            m.setattr(arr, "_own_operator", lambda *args: None)
            r_ref = [t.clone().requires_grad_() for t in base]
            ref_loss = arr_loss(reference, r_ref, y, weight=1.5, momentum=0.2, form=form)
            ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(memory.mean, reference.mean, rtol=1e-5, atol=1e-6)
        for j, (got, ref) in enumerate(zip(r, r_ref)):       # weight / numel * sign(r - t), both paths
            assert got.grad.dtype == dtype
            assert_sign_gradient(got.grad, diff[j], 1.5 / diff.numel())
            assert_sign_gradient(ref.grad.to(dtype), diff[j], 1.5 / diff.numel())
    assert calls == [dtype] * 3


@pytest.mark.parametrize("own", [True, False])
def test_gradient_is_the_sign_of_the_difference_and_update_false_leaves_the_memory(own, monkeypatch):
    """dL/dr = weight / numel * sign(r - t), through ARR's C++ operator and through the PyTorch
    operators; with update=False the memory is untouched; the operator's backward node takes
    saved-tensor hooks and a retained graph; in inference mode the operator gives the same loss
    without a graph."""
    from bionets.layers import arr
    if own:
        own = own_cpu_kernels("arr_cpu")
    else:
        monkeypatch.setattr(arr, "_own_operator", lambda *args: None)
    mem = ArrMemory(1, 2, 2)
    mem.mean[0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mem.seen[0] = 1
    r = torch.tensor([[2.0, 1.0], [0.0, -2.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 1, 0])
    loss = arr_loss(mem, [r], y, weight=3.0, momentum=0.5, form="paper", update=False)
    assert loss.item() == pytest.approx(3.0 * 3.5 / 6)
    loss.backward()
    # targets (paper): (1,1), (0,0), (1.5,1) -> signs (+,0), (0,-), (-,0)
    torch.testing.assert_close(r.grad, 0.5 * torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(mem.mean[0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    if not own:
        return
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or ("packed", t), lambda p: p[1]):
        hooked = arr_loss(mem, [r], y, weight=3.0, momentum=0.5, form="paper", update=False)
    assert "ArrBackward" in hooked.grad_fn.name() and packed == [(1, 3, 2)] * 2     # its slope and r
    first = torch.autograd.grad(hooked, r, retain_graph=True)[0]     # a retained graph's second backward
    torch.testing.assert_close(torch.autograd.grad(hooked, r)[0], first, rtol=0, atol=0)
    torch.testing.assert_close(first, r.grad, rtol=0, atol=0)
    assert arr._own_operator(ArrMemory(1, 2, 2), [], y) is own      # the probe the CUDA tests skip by
    op, calls = own.arr_loss, []
    monkeypatch.setattr(own, "arr_loss", types.SimpleNamespace(default=lambda *a: calls.append(1) or op(*a)))
    with torch.inference_mode():
        again = arr_loss(mem, [r.detach()], y, weight=3.0, momentum=0.5, form="paper")
    assert calls == [1] and again.item() == pytest.approx(loss.item())
    torch.testing.assert_close(mem.mean[0], torch.tensor([[1.25, 1.0], [0.0, -1.0]]))


@pytest.mark.parametrize("own", [True, False])
def test_a_gradient_penalty_on_arr_alone_differentiates_to_zeros(own, monkeypatch):
    """ARR's gradient is piecewise constant in r: differentiating it again (create_graph, a gradient
    penalty) gives zeros, through ARR's operator as through the PyTorch operators."""
    from bionets.layers import arr
    if own:
        own_cpu_kernels("arr_cpu")
    else:
        monkeypatch.setattr(arr, "_own_operator", lambda *args: None)
    r = torch.randn(6, 3, requires_grad=True)
    loss = arr_loss(ArrMemory(1, 2, 3), [r], torch.tensor([0, 1, 0, 1, 0, 0]), weight=1.0, momentum=0.1)
    g, = torch.autograd.grad(loss, r, create_graph=True)
    assert g.requires_grad and g.abs().sum() > 0
    second, = torch.autograd.grad(g.square().sum(), r)
    assert not second.any()


def build(model="test_mlp", **arr):
    import timm
    m = timm.create_model(model, num_classes=10, in_chans=1, img_size=8)
    m, hooks, reports = apply_mechanisms(m, parse_mechanisms({"arr": {"weight": 1.0, **arr}}))
    for h in hooks:
        h.attach(m)
    return m, hooks[0]


def test_memory_is_saved_and_eval_is_unaffected():
    model, hook = build()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model.train()
    hook.aux_loss(model, x, model(x), y)
    state = model.state_dict()
    assert "arr_memory.mean" in state and state["arr_memory.seen"].any()
    fresh, _ = build()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.arr_memory.mean, model.arr_memory.mean)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert hook.aux_loss(model, x, out, y) is None
        feats = model.forward_head(model.forward_features(x))
    torch.testing.assert_close(out, feats)


@pytest.mark.parametrize("opts, message", [
    ({"momentum": 1.0}, r"mechanisms.arr.momentum': Input should be less than 1 \(got 1.0\)"),
    ({"weight": -1}, r"mechanisms.arr.weight': Input should be greater than or equal to 0 \(got -1\)"),
    ({"layers": "blocks"}, "needs a transformer"),
])
def test_bad_options_are_one_line(opts, message):
    with pytest.raises(BionetsError, match=message):
        build(**opts)


def test_arr_loss_called_directly_checks_its_arguments():
    memory, r, y = ArrMemory(1, 3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    for kwargs in ({"form": "bogus"}, {"momentum": 1.5}, {"weight": -1.0}):
        with pytest.raises(BionetsError, match="arr_loss needs form in"):
            arr_loss(memory, [r], y, **{"weight": 1.0, "momentum": 0.1, **kwargs})
    with pytest.raises(BionetsError, match="a target outside 0..2"):
        arr_loss(memory, [r], torch.tensor([0, 1, 5, 1]), weight=1.0, momentum=0.1)
    # targets as a list, one-hot, or [N, 1]: AttributeError or a C++ error before
    for targets, got in (([0, 1, 2, 1], "a list"), (torch.eye(3)[y], "a torch.float32 tensor of shape \\(4, 3\\)"),
                         (y[:, None], "a torch.int64 tensor of shape \\(4, 1\\)")):
        with pytest.raises(BionetsError, match=f"arr_loss takes targets as a 1-D integer tensor of class indices, got {got}"):
            arr_loss(memory, [r], targets, weight=1.0, momentum=0.1)
    # too many, wrong widths, none; as one tensor: too many layers, wrong width, not [J, N, D]
    for responses in ([r, r], [torch.randn(4, 3)], [torch.randn(4, 2, 1)], [], torch.randn(2, 4, 2), torch.randn(1, 4, 3),
                      r):
        with pytest.raises(BionetsError, match="for a memory of 1 layer"):
            arr_loss(memory, responses, y, weight=1.0, momentum=0.1)
    with pytest.raises(BionetsError, match=r"\[3\] responses for 4 targets"):
        arr_loss(memory, torch.randn(1, 3, 2), y, weight=1.0, momentum=0.1)


def test_arr_loss_refuses_bool_targets():
    """Bool targets were read as classes 0 and 1."""
    with pytest.raises(BionetsError, match="1-D integer tensor of class indices, got a torch.bool tensor of shape"):
        arr_loss(ArrMemory(1, 3, 2), [torch.randn(4, 2)], torch.tensor([True, False, True, True]), weight=1.0,
                 momentum=0.1)


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_arr_loss_takes_targets_of_any_integer_dtype(dtype, own, monkeypatch):
    """The same loss and memory as int64 targets (the PyTorch operators' scatter took int32/int64 only)."""
    from bionets.layers import arr
    if not own:
        monkeypatch.setattr(arr, "_own_operator", lambda *args: None)
    torch.manual_seed(0)
    r, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    results = []
    for targets in (y, y.to(dtype)):
        memory = ArrMemory(1, 3, 2)
        results.append((arr_loss(memory, [r], targets, weight=1.0, momentum=0.1), memory.mean))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("blocks, message", [
    ([torch.randn(2, 3)], r"got a list of \[a torch.float32 tensor of shape \(2, 3\)\]"),   # was feature 0 of each sample
    ([torch.randn(3)], r"got a list of \[a torch.float32 tensor of shape \(3,\)\]"),
    ([torch.randn(2, 0, 3)], r"T >= 1 tokens .*shape \(2, 0, 3\)"),
    (torch.randn(2, 4, 3), r"single block: \[x\]\), got a torch.float32 tensor of shape \(2, 4, 3\)$"),
    ([], r"got a list of \[\]"),
    ([torch.randn(2, 4, 3).numpy()], r"got a list of \[a numpy array of shape \(2, 4, 3\)\]"),
    ([torch.randn(2, 4, 3), torch.randn(3, 4, 3)], r"shapes \[\(2, 4, 3\), \(3, 4, 3\)\] .*same N samples and D features"),
    ([torch.randn(2, 4, 3), torch.randn(2, 4, 2)], r"shapes \[\(2, 4, 3\), \(2, 4, 2\)\] .*same N samples and D features"),
])
def test_class_tokens_refuses_what_is_no_list_of_block_outputs(blocks, message):
    with pytest.raises(BionetsError, match=message):
        class_tokens(blocks)


def test_class_tokens_takes_blocks_of_different_token_counts():
    """Only N and D must agree: blocks with other token counts (ConViT-like) take the plain slices."""
    blocks = [torch.randn(2, 4, 3), torch.randn(2, 5, 3)]
    assert torch.equal(class_tokens(tuple(blocks)), torch.stack([x[:, 0] for x in blocks]))


def test_per_sample_averages_time_steps_and_checks_its_arguments():
    r = torch.arange(12.0).view(6, 2)                               # 3 time steps of 2 samples
    torch.testing.assert_close(per_sample(r, 2), r.view(3, 2, 2).mean(0))
    assert per_sample(r, 6) is r and per_sample(r, 4) is r and per_sample(r, 0) is r
    # an empty batch: no rows back, not n rows of NaN (arr_loss then names the counts)
    empty = per_sample(torch.randn(0, 2), 3)
    assert empty.shape == (0, 2)
    with pytest.raises(BionetsError, match=r"\[0\] responses for 3 targets"):
        arr_loss(ArrMemory(1, 3, 2), [empty], torch.tensor([0, 1, 2]), weight=1.0, momentum=0.1)
    # integer spike counts: a float firing rate (torch's mean takes no integers)
    counts = torch.tensor([[1, 0], [2, 1], [0, 1], [1, 1]])
    torch.testing.assert_close(per_sample(counts, 2), torch.tensor([[0.5, 0.5], [1.5, 1.0]]))
    torch.testing.assert_close(per_sample(counts > 0, 2), torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    for n in (-3, 3.0, True, None, torch.tensor(3)):
        with pytest.raises(BionetsError, match=f"n, the number of samples, as a whole number >= 0, got .* and n="):
            per_sample(r, n)
    with pytest.raises(BionetsError, match=r"got a list of \[a list of \[a float, a float\]\] and n=2"):
        per_sample([[1.0, 2.0]], 2)


def test_arr_loss_with_one_2d_tensor_says_to_wrap_it_in_a_list():
    """The API takes a list of [N, D] or one [J, N, D]: a bare [N, D] tensor's message said 'give 1 to 1
    [N, 3] tensors', which it was."""
    with pytest.raises(BionetsError, match=r"one tensor of shape \(5, 3\) for a memory of 1 layer.* in a list, \[r\]"):
        arr_loss(ArrMemory(1, 4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]), weight=1.0, momentum=0.1)


@pytest.mark.parametrize("kwargs", [{"momentum": "0.1"}, {"weight": None}, {"weight": float("inf")},
                                    {"weight": float("nan")}, {"momentum": float("nan")}, {"weight": True},
                                    {"momentum": torch.tensor(0.1)}, {"momentum": -0.1}])
def test_arr_loss_refuses_weights_and_momenta_that_are_no_valid_numbers(kwargs):
    """As ArrConfig: weight finite >= 0, momentum in [0, 1), plain numbers (a string or None was a
    TypeError, an infinite weight an infinite loss)."""
    with pytest.raises(BionetsError, match="momentum a number in .0, 1. and weight a finite number >= 0, got"):
        arr_loss(ArrMemory(1, 3, 2), [torch.randn(4, 2)], torch.tensor([0, 1, 2, 1]),
                 **{"weight": 1.0, "momentum": 0.1, **kwargs})


def test_arr_loss_takes_numpy_numbers_for_weight_and_momentum():
    import numpy as np
    r, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    want = arr_loss(ArrMemory(1, 3, 2), [r], y, weight=2.0, momentum=0.1)
    torch.testing.assert_close(arr_loss(ArrMemory(1, 3, 2), [r], y, weight=np.float32(2), momentum=np.float64(0.1)), want)


@pytest.mark.parametrize("responses, message", [
    ([torch.randn(4, 2, dtype=torch.complex64)], "floating-point responses, got a list of .a torch.complex64 tensor"),
    (torch.randn(1, 4, 2, dtype=torch.complex64), "floating-point responses, got a torch.complex64 tensor"),
    ([torch.randint(0, 3, (4, 2))], "floating-point responses, got a list of .a torch.int64 tensor"),
    ([torch.randn(4, 2).numpy()], r"responses as torch tensors .*got a list of \[a numpy array of shape \(4, 2\)\]"),
    ("r", "responses as torch tensors .*got a str"),
])
def test_arr_loss_refuses_responses_that_are_no_floating_point_tensors(responses, message):
    """Complex responses were cast to their real part with a warning only; numpy arrays and integers
    failed inside."""
    with pytest.raises(BionetsError, match=message):
        arr_loss(ArrMemory(1, 3, 2), responses, torch.tensor([0, 1, 2, 1]), weight=1.0, momentum=0.1)


@pytest.mark.parametrize("own", [True, False])
def test_arr_loss_takes_the_layers_as_one_tensor(own, monkeypatch):
    """[J, N, D] as one tensor gives the loss, gradients and memory that its J slices give as a list."""
    from bionets.layers import arr
    if not own:
        monkeypatch.setattr(arr, "_own_operator", lambda *args: None)
    torch.manual_seed(0)
    base, y = torch.randn(3, 10, 4), torch.randint(0, 5, (10,))
    results = []
    for as_one in (True, False):
        memory, r = ArrMemory(3, 5, 4), base.clone().requires_grad_()
        loss = arr_loss(memory, r if as_one else list(r.unbind(0)), y, weight=2.0, momentum=0.2)
        loss.backward()
        results.append((loss.detach(), r.grad, memory.mean, memory.seen))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_class_tokens_are_the_stacked_slices_with_their_gradients():
    """class_tokens against torch.stack([x[:, 0] ...]): the same values, gradients checked in float64
    (first and second order); blocks of different shapes take the plain slices."""
    torch.manual_seed(0)
    blocks = [torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.equal(class_tokens(blocks), torch.stack([x[:, 0] for x in blocks]))
    assert type(class_tokens(blocks).grad_fn).__name__ == "_ClassTokensBackward"
    torch.autograd.gradcheck(lambda *xs: class_tokens(list(xs)), blocks)
    torch.autograd.gradgradcheck(lambda *xs: class_tokens(list(xs)), blocks)
    mixed = blocks[:2] + [torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)]
    out = class_tokens(mixed)
    assert torch.equal(out, torch.stack([x[:, 0] for x in mixed])) and type(out.grad_fn).__name__ == "StackBackward0"


def test_arr_on_a_vit_through_class_tokens_matches_the_slices(monkeypatch):
    """The hook takes a ViT's class tokens through class_tokens: the loss and every parameter's
    gradient are those of the slices taken one block at a time."""
    from bionets.mechanisms import arr as arr_mechanism
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=8, depth=3).double()
    model, hooks, _ = apply_mechanisms(model, parse_mechanisms({"arr": {"weight": 5.0}}))
    hooks[0].attach(model)
    model.train()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results, taken = [], []
    for plain in (False, True):
        model.load_state_dict(state)
        model.zero_grad()
        if plain:
            monkeypatch.setattr(arr_mechanism, "class_tokens", lambda blocks: torch.stack([b[:, 0] for b in blocks]))
        else:
            monkeypatch.setattr(arr_mechanism, "class_tokens",
                                lambda blocks: taken.append(len(blocks)) or class_tokens(blocks))
        for _ in range(2):          # the second step against the means the first one left
            model.zero_grad()
            loss = hooks[0].aux_loss(model, x, model(x), y)
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]      # the head takes none
        results.append((loss.detach(), grads, model.arr_memory.mean.clone()))
    assert taken == [3, 3] and results[0][0] > 0 and len(results[0][1]) == len(results[1][1]) > 30
    model(x)
    assert all(r is None for r in hooks[0].responses) and all(b is not None for b in hooks[0].blocks)
    want = hooks[0].taken()                                                  # sliced from the blocks kept
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)     # as the hooks run inside a compiled model
    model(x)
    assert hooks[0].blocks == [None] * 3 and all(r is not None for r in hooks[0].responses)
    for got, expected in zip(hooks[0].taken(), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-12, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_attaching_the_hook_to_a_model_without_arr_is_one_line():
    import timm
    _, hook = build()
    with pytest.raises(BionetsError, match=r"ArrHook.attach: the \w+ has no ARR memory .*returned, or a copy"):
        hook.attach(timm.create_model("test_mlp", in_chans=1, img_size=8, num_classes=3))
    with pytest.raises(BionetsError, match="ArrHook.attach takes a torch.nn.Module, got str"):
        hook.attach("model")


def test_arr_without_classifier_is_one_line():
    with pytest.raises(BionetsError, match="cannot find the classifier"):
        apply_mechanisms(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU()), parse_mechanisms({"arr": {}}))


def test_headless_timm_model_is_one_line_not_a_wrong_layer():
    """A timm ViT built with num_classes=0 has no classifier: ARR says so, instead of taking the last
    block's MLP for it."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=0)
    for layers in ("auto", "classifier"):
        with pytest.raises(BionetsError, match="get_classifier.. is Identity: create the model with num_classes > 0"):
            apply_mechanisms(model, parse_mechanisms({"arr": {"layers": layers}}))


def test_a_classifier_replaced_after_arr_is_one_line():
    """timm's reset_classifier after ARR: its hook watches a layer that is gone."""
    model, hooks, _ = apply_mechanisms(timm.create_model("test_mlp"), parse_mechanisms({"arr": {}}))
    hooks[0].attach(model)
    model.reset_classifier(5)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(BionetsError, match="ARR's classifier 'head' is no longer in the model .*reset_classifier"):
        hooks[0].aux_loss(model, x, model(x), torch.tensor([0, 1]))


class TwoHeads(torch.nn.Module):
    """A model whose last registered Linear (``aux``) is not its classifier (``cls``)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU())
        self.cls, self.aux = torch.nn.Linear(16, 5), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.cls(self.body(x))


def test_a_layer_taken_for_the_classifier_that_is_none_is_one_line_and_the_classifier_can_be_named():
    """Found as the model's last Linear: a head that gives other than the logits, or reads tokens,
    is refused at the first training step (it ran as if the features were right, or failed on a
    shape); classifier=NAME names the layer, and a name that is no layer is one line."""
    x, y = torch.randn(4, 12), torch.tensor([0, 1, 2, 4])
    model, hooks, _ = apply_mechanisms(TwoHeads(), parse_mechanisms({"arr": {}}))
    hooks[0].attach(model)
    with pytest.raises(BionetsError, match="input of 'aux' as the classifier's, but it gives 3 outputs where the model "
                                           "gives 5 logits: .* mechanisms.arr.classifier=NAME"):
        hooks[0].aux_loss(model, x, model(x), y)
    model, hooks, _ = apply_mechanisms(TwoHeads(), parse_mechanisms({"arr": {"classifier": "cls"}}))
    hooks[0].attach(model)
    assert model.arr_memory.mean.shape == (1, 5, 16)
    model(x)
    torch.testing.assert_close(hooks[0].taken()[0], model.body(x))
    assert hooks[0].aux_loss(model, x, model(x), y) is not None
    for name, message in (("clss", "TwoHeads has no module of that name; its last Linear/Conv2d modules are "
                                   r"\['body.1', 'cls', 'aux'\]"),
                          ("body.2", "is a ReLU without a Linear or Conv2d layer")):
        with pytest.raises(BionetsError, match=f"arr classifier='{name}'.*{message}"):
            apply_mechanisms(TwoHeads(), parse_mechanisms({"arr": {"classifier": name}}))
    from torchvision.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    vit.heads.head = torch.nn.Identity()                          # headless: its last Linear is an MLP's
    vit, hooks, _ = apply_mechanisms(vit, parse_mechanisms({"arr": {}}))
    hooks[0].attach(vit)
    with pytest.raises(BionetsError, match=r"'encoder.layers.encoder_layer_0.mlp.3' .* its input is a \(2, 5, 16\) "
                                           "tensor \(tokens"):
        vit(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("inplace", [False, True])
def test_arr_reads_the_features_before_a_dropout_beside_the_classifier(inplace):
    """torchvision's Sequential(Dropout, Linear) heads: ARR's responses are the pooled features, not
    the dropped ones, in training; an in-place dropout still drops in what the classifier reads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 32), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Dropout(0.5, inplace=inplace), torch.nn.Linear(32, 3)))
    model, hooks, _ = apply_mechanisms(model, parse_mechanisms({"arr": {}}))
    hooks[0].attach(model)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    seen = []
    model[3][1].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    model.train()
    logits = model(x)
    features = model[2](model[1](model[0](x)))
    torch.testing.assert_close(hooks[0].taken()[0], features)
    assert (seen[0] == 0).sum() > (features == 0).sum()          # the classifier's input was dropped
    hooks[0].aux_loss(model, x, logits, y)
    assert hooks[0].dropped is None


def test_arr_true_in_a_config_applies_it_with_its_defaults():
    assert parse_mechanisms({"arr": True})["arr"].weight == 10.0
    assert "arr" not in parse_mechanisms({"arr": False})


def test_a_model_with_arr_attached_still_pickles():
    model, hook = build()
    model.train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    hook.aux_loss(model, x, model(x), y)
    copy = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(copy.arr_memory.mean, model.arr_memory.mean)


def _ddp_worker(rank, port, r, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    for form in ("paper", "code"):
        mem = ArrMemory(1, 3, 2)
        # the samplers deal a global batch out: process r takes positions r, r + 2, r + 4, ...
        loss = arr_loss(mem, [r[rank::2]], y[rank::2], weight=1.0, momentum=0.1, form=form)
        out[rank, form] = (mem.mean.clone(), loss.item())
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_update_as_one_process_does_on_the_global_batch():
    """Both processes end with the memory one process computes from the whole batch in its order,
    and their losses average to its loss (ARR depends on the order: the first sample of a class
    sets its mean, and the means are updated sample by sample)."""
    torch.manual_seed(0)
    r, y = torch.randn(12, 2), torch.tensor([0, 1, 1, 0, 2, 0, 2, 1, 0, 0, 1, 2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, r, y, out), nprocs=2)
    for form in ("paper", "code"):
        single = ArrMemory(1, 3, 2)
        loss = arr_loss(single, [r], y, weight=1.0, momentum=0.1, form=form)
        torch.testing.assert_close(out[0, form][0], out[1, form][0])
        torch.testing.assert_close(out[0, form][0], single.mean)
        assert (out[0, form][1] + out[1, form][1]) / 2 == pytest.approx(loss.item())


def _train_digits_mlp_with_arr(weight: float):
    """60 Adam steps of a 64-32-10 MLP on the digits with ARR (``weight``) on its hidden features:
    (first and last losses, accuracy, within-class over between-class spread of the features)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    torch.manual_seed(0)
    body, head = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU()), torch.nn.Linear(32, 10)
    memory, losses = ArrMemory(1, 10, 32), []
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(60):
        idx = torch.randint(0, len(y), (128,))
        h = body(x[idx])
        loss = torch.nn.functional.cross_entropy(head(h), y[idx])
        opt.zero_grad()
        (loss + arr_loss(memory, [h], y[idx], weight=weight, momentum=0.1)).backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        h = body(x)
        means = torch.stack([h[y == k].mean(0) for k in range(10)])
        spread = (h - means[y]).abs().mean() / (means - means.mean(0)).abs().mean()
        return losses[0], sum(losses[-5:]) / 5, (head(h).argmax(1) == y).float().mean().item(), spread.item()


def test_arr_alone_trains_and_draws_each_class_together():
    """ARR on its own (no RAA): the model trains, and its features' spread within a class, relative
    to the spread between the classes' means, is smaller than in the same run without ARR (0.51
    against 0.59 measured), which is what ARR's loss asks for."""
    first, last, accuracy, spread = _train_digits_mlp_with_arr(1.0)
    assert last < 0.2 * first and accuracy > 0.9
    assert spread < 0.95 * _train_digits_mlp_with_arr(0.0)[3]


def test_cli_run_with_raa_and_arr(tmp_path):
    args = ["train", "dnrt/digits", "train.epochs=2", "mechanisms={raa: {}, arr: {weight: 1.0}}", f"out_dir={tmp_path}",
            "name=r", "--quiet"]
    assert main(args) == 0
    import json
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_top1"] > 80
    cfg = load_config(str(tmp_path / "r" / "config.yaml"))
    assert set(cfg.mechanisms) == {"raa", "arr"}
    assert main(["eval", str(tmp_path / "r" / "best.pt")]) == 0


def test_arr_on_an_empty_batch():
    """An empty batch adds a zero loss (not NaN) and leaves the class means alone."""
    memory = ArrMemory(1, 3, 4)
    r = torch.randn(0, 4, requires_grad=True)
    loss = arr_loss(memory, [r], torch.zeros(0, dtype=torch.long), weight=0.1, momentum=0.9)
    loss.backward()
    assert loss.item() == 0.0 and r.grad.shape == (0, 4)
    assert not memory.seen.any() and not memory.mean.any()


def _vit_last_block_output(model, x):
    """ARR's response from the last block and that block's output, for one training forward."""
    outs = []
    handle = model.blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o))
    model.train()
    model(x)
    handle.remove()
    return outs[0]


@pytest.mark.parametrize("name, kwargs, reads", [
    ("vit_tiny_patch16_224", {}, "class token"),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, "patch mean"),           # its head reads the mean
    ("vit_tiny_patch16_224", {"reg_tokens": 2, "global_pool": "avg"}, "patch mean"),
    ("deit_tiny_distilled_patch16_224", {}, "class token"),                  # two heads: the class head's count
    ("cait_xxs24_224", {"patch_size": 8}, "patch mean"),                      # class token joins after blocks
])
def test_arr_on_a_vit_reads_what_its_head_reads(name, kwargs, reads):
    """The class token only where the block's output holds one and the head pools by it; it took
    CaiT's first patch token for its class token, and a mean-pooled ViT's unread class token."""
    model = timm.create_model(name, num_classes=10, img_size=32, depth=2, **kwargs)
    model, hooks, _ = apply_mechanisms(model, parse_mechanisms({"arr": {}}))
    hook = hooks[0]
    hook.attach(model)
    out = _vit_last_block_output(model, torch.randn(2, 3, 32, 32))
    prefix = out.shape[1] - model.patch_embed.num_patches
    expected = out[:, 0] if reads == "class token" else out[:, prefix:].mean(1)
    assert hook.layers == "blocks" and len(hook.responses) == 2
    torch.testing.assert_close(hook.taken()[-1], expected)
    assert model.arr_memory.mean.shape == (2, 10, model.embed_dim)


def test_arr_finds_class_layers_inside_heads():
    """SqueezeNet's classifier is a 1x1 conv in a Sequential (its input is averaged over pixels);
    LeViT's heads are a (head, head_dist) pair of normed linears."""
    import torchvision
    squeeze, hooks, _ = apply_mechanisms(torchvision.models.squeezenet1_1(num_classes=5),
                                         parse_mechanisms({"arr": {}}))
    assert squeeze.arr_memory.mean.shape == (1, 5, 512)
    hooks[0].attach(squeeze)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 4])
    squeeze.train()
    assert torch.isfinite(hooks[0].aux_loss(squeeze, x, squeeze(x), y))
    levit, _, _ = apply_mechanisms(timm.create_model("levit_128s", num_classes=7), parse_mechanisms({"arr": {}}))
    assert levit.arr_memory.mean.shape[1] == 7


def test_hook_attached_twice_and_forwards_without_loss_keep_one_forward():
    """Attaching again replaces the hooks (twice attached, each block's response came twice and a
    block's memory took another block's features); forwards without aux_loss do not pile up."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=3)
    model, hooks, _ = apply_mechanisms(model, parse_mechanisms({"arr": {}}))
    hooks[0].attach(model)
    hooks[0].attach(model)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        model(x)
    assert len(hooks[0].responses) == 3


def test_a_deep_copy_needs_the_hook_attached_and_then_keeps_one_capture():
    """A deep copy of a model copies its ARR captures, each feeding a copy of the hook: the hook the
    loop holds saw nothing (it returned None, ARR silently off). Now that is an error, and attaching
    to the copy drops the copied capture."""
    from copy import deepcopy
    model, hook = build()
    copy = deepcopy(model).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(BionetsError, match="saw no training forward pass with gradients since its last aux_loss"):
        hook.aux_loss(copy, x, copy(x), y)
    hook.attach(copy)
    head = copy.get_classifier()
    assert len(head._forward_pre_hooks) == 1
    assert hook.aux_loss(copy, x, copy(x), y) is not None and copy.arr_memory.seen.any()
    assert not model.arr_memory.seen.any()
    # a ViT's copy carries the blocks' captures and the patch embedding's counter: none is left but the hook's own
    vit, vit_hooks, _ = apply_mechanisms(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2),
                                         parse_mechanisms({"arr": {}}))
    vit_hooks[0].attach(vit)
    for _ in range(2):
        vit = deepcopy(vit)
        vit_hooks[0].attach(vit)
    owners = [getattr(fn, "__self__", None) for m in vit.modules()
              for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert len(owners) == 3 and all(o is vit_hooks[0] for o in owners)     # 2 blocks + the patch embedding


def test_targets_for_part_of_a_batch_are_one_line_outside_spiking_nets():
    """A plain model's rows are its samples: 4 targets for 8 rows are a mistake, not 2 time steps."""
    model, hook = build()
    model.train()
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(BionetsError, match=r"\[8\] responses for 4 targets"):
        hook.aux_loss(model, x, model(x), torch.randint(0, 10, (4,)))


def test_aux_loss_before_attach_is_one_line():
    model, hooks, _ = apply_mechanisms(timm.create_model("test_mlp", num_classes=10, in_chans=1, img_size=8),
                                       parse_mechanisms({"arr": {}}))
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(BionetsError, match="call hook.attach.model. once before training"):
        hooks[0].aux_loss(model, x, model(x), torch.tensor([0, 1]))


def test_class_means_stay_float32_when_the_model_is_halved():
    model, _ = build()
    model.half()
    assert model.arr_memory.mean.dtype == torch.float32 and model.arr_memory.seen.dtype == torch.uint8
    model.double()
    assert model.arr_memory.mean.dtype == torch.float64


def test_the_operator_under_compiled_autograd_and_forward_ad():
    """Compiled autograd (torch._dynamo's traced backward) runs ARR's C++ backward as one opaque call,
    to the eager gradient; the operator itself refuses forward-mode AD in one line (arr_loss computes
    ARR with PyTorch's operators there)."""
    from torch._dynamo import compiled_autograd
    from torch.autograd import forward_ad

    own = own_cpu_kernels("arr_cpu")
    torch.manual_seed(0)
    r = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    want = torch.autograd.grad(arr_loss(ArrMemory(1, 3, 4), [r], y, weight=2.0, momentum=0.1), r)[0]
    with compiled_autograd._enable(torch.compile(backend="eager")):
        arr_loss(ArrMemory(1, 3, 4), [r], y, weight=2.0, momentum=0.1).backward()
    torch.testing.assert_close(r.grad, want, rtol=0, atol=0)
    memory = ArrMemory(1, 3, 4)
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="ARR operator: no forward-mode derivative"):
        own.arr_loss.default(forward_ad.make_dual(r.detach(), torch.ones_like(r))[None], y, memory.mean, memory.seen,
                             0.1, 2.0, False, True)
    assert not memory.seen.any()                             # refused before the memory's update
