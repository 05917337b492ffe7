"""RAA's and ARR's CUDA C++ kernels (raa_cuda.cu, arr_cuda.cu and their operators) run on the CPU
through tests/cuda_emulation.h, on every machine with a C++ compiler: their results against the
direct float64 formulas and the PyTorch paths, the same bits whatever order the blocks and threads
run in, and the scratch the backward keeps in the forward's buffer. tests/test_cuda.py runs them
on a GPU."""
import math

import pytest
import torch

from compile_helpers import needs_cpu_compiler
from cuda_emulated import (RAA_CUDA_CASES, assert_backward_twice_and_interleaved, assert_misaligned_like_aligned,
                           assert_nan_and_inference_mode, ops)
from test_arr import assert_sign_gradient, loop_loss

pytestmark = needs_cpu_compiler


@pytest.fixture(scope="module")
def raa_ops():
    return ops("raa_cuda")


@pytest.fixture(scope="module")
def arr_ops():
    return ops("arr_cuda")


def _on_emulated_kernels(monkeypatch, emulated):
    """RAA modules call the emulated CUDA operator for float32, bf16 and fp16 tensors (in these tests'
    layouts, which the CUDA kernels take); float64 references keep the PyTorch path."""
    import bionets.layers.raa as raa_module
    own = raa_module._own_kernels
    monkeypatch.setattr(raa_module, "_own_kernels", lambda x, *args: emulated if x.dtype in (
        torch.float32, torch.bfloat16, torch.float16) else own(x, *args))


def _raa(width, variant="vector", base="gelu", dim=None, scale=0.2):
    from bionets.layers.raa import RAA
    raa = RAA(width, variant=variant, base=base, dim=dim)
    with torch.no_grad():
        for p in raa.parameters():
            p.normal_(0, scale)
    return raa


def _in_layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


@pytest.mark.parametrize("variant,base", [("vector", "gelu"), ("vector", "relu"), ("scalar", "gelu"), ("scalar", "relu")])
def test_raa_cuda_kernels_match_float64_autograd(raa_ops, variant, base, monkeypatch):
    """The CUDA kernels in float32, every layout they read without a copy (a channels_last map's
    gradient arrives contiguous and is re-laid), against autograd of RAA in float64. The three large
    cases (many blocks, split partial sums: 2.8-5.2 s each emulated) run with each variant once, in
    one base: the base changes only the elementwise part, which the small cases cover."""
    _on_emulated_kernels(monkeypatch, raa_ops)
    torch.manual_seed(0)
    large = (variant, base) in {("vector", "gelu"), ("scalar", "relu")}
    for shape, dim, layout in RAA_CUDA_CASES:
        if math.prod(shape) > 250_000 and not large:
            continue
        ref = _raa(shape[dim], variant, base).double()
        emulated = _raa(shape[dim], variant, base)
        emulated.load_state_dict(ref.state_dict())
        x = torch.randn(shape, dtype=torch.float64)
        xe = _in_layout(x.float(), layout).requires_grad_()
        out = emulated(xe)
        g = torch.randn_like(x)
        out.backward(g.float())
        xr = x.clone().requires_grad_()
        want = ref(xr)
        want.backward(g)
        torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
        assert out.stride() == xe.stride() and xe.grad.stride() == xe.stride()
        torch.testing.assert_close(xe.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
        for p, q in zip(emulated.parameters(), ref.parameters()):
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def _forward_backward(ops_, x, w, dim, relu, g, seed):
    """(y, dL/dx, dL/dw) from the emulated operator (w = [v | c]), its blocks and threads in ``seed``'s order."""
    ops_.set_seed(seed)
    x, w = (t.detach().requires_grad_() for t in (x, w))
    out = ops_.raa(x, w, dim, relu)
    return (out, *torch.autograd.grad(out, (x, w), g))


@pytest.mark.parametrize("shape, dim, dtype", [((16, 16, 32, 32), 1, torch.float32), ((2, 700, 768), -1, torch.float32),
                                               ((2, 700, 768), -1, torch.bfloat16)])
def test_raa_cuda_kernels_give_the_same_bits_in_any_block_and_thread_order(raa_ops, shape, dim, dtype, monkeypatch):
    """The sums over vectors run in a fixed order (per block, then over the blocks by the last block
    to finish or by the column-sum kernel): two runs in other block and thread orders give the same
    bits. ResNet-20's 16 channels, channels_last, in 16-byte chunks on 256 blocks (their partial
    sums summed by the last block in 15 slices, kept in the forward's buffer); ViT-Tiny's 768-wide
    MLP, one element a thread a step in float32 (192 chunks are more than the rows kernels take), 4
    chunks a thread in bf16, whose partial sums the backward allocates and a second kernel sums."""
    torch.manual_seed(0)
    raa = _raa(shape[dim], dim=dim)
    x, g = (_in_layout(torch.randn(shape).to(dtype), "channels_last" if dim == 1 else "") for _ in range(2))
    runs = [_forward_backward(raa_ops, x, raa.vc, dim, False, g, seed) for seed in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with torch.no_grad():
        s = (x.double() * (raa.v.double().view(-1, 1, 1) if dim == 1 else raa.v.double())).sum(dim, keepdim=True)
        z = x.double() + s + raa.c.double()
        gs = (g.double() * x.double() * torch.exp(-z * z / 2) / (2 * torch.pi) ** 0.5).sum(dim, keepdim=True)
    torch.testing.assert_close(runs[0][2][-1:].double(), gs.sum().view(1), rtol=1e-4, atol=1e-3)     # dL/dc


def test_raa_cuda_misaligned_tensors_take_the_element_kernels(raa_ops):
    """assert_misaligned_like_aligned, emulated."""
    raa_ops.set_seed(0)
    assert_misaligned_like_aligned(raa_ops.raa, "cpu")


@pytest.mark.parametrize("shape, dim", [((64, 16, 10, 10), 1), ((4, 260, 768), -1)])
def test_raa_cuda_backward_twice_and_graphs_interleaved(raa_ops, shape, dim, monkeypatch):
    """The backward's scratch in the forward's buffer (assert_backward_twice_and_interleaved), both
    places of the partial sums: the forward's buffer (16 channels) and the backward's own (768
    features on 130 blocks, summed by the column-sum kernel)."""
    _on_emulated_kernels(monkeypatch, raa_ops)
    torch.manual_seed(0)
    raa = _raa(shape[dim], dim=dim)
    xs = [_in_layout(torch.randn(shape), "channels_last" if dim == 1 else "") for _ in range(2)]
    assert_backward_twice_and_interleaved(raa, xs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["gelu", "relu"])
def test_raa_cuda_kernels_in_half_precision(raa_ops, dtype, base):
    """bf16 and fp16 maps and tokens are read and written as they are, computed in float32: the
    output and dL/dx are the float32 kernels' on the same values to the dtype's rounding; dL/dv and
    dL/dc are float32, within float32 rounding of them."""
    torch.manual_seed(0)
    for shape, dim, layout in [((8, 32, 6, 6), 1, "channels_last"), ((6, 64, 96), -1, ""), ((4, 16, 9, 9), 1, "nchw")]:
        raa = _raa(shape[dim], base=base)
        x, g = (_in_layout(torch.randn(shape).to(dtype), layout) for _ in range(2))
        half, full = (_forward_backward(raa_ops, x.to(t), raa.vc, dim, base == "relu", g.to(t), 0)
                      for t in (dtype, torch.float32))
        assert half[0].dtype == half[1].dtype == dtype and half[2].dtype == torch.float32
        for a, b in zip(half[:2], full[:2]):
            assert ((a.float() - b).abs().max() / b.abs().max()).item() < 2 ** -7
        for a, b in zip(half[2:], full[2:]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_raa_cuda_operator_in_inference_mode_and_with_nan(raa_ops, monkeypatch):
    """NaN input and inference mode (assert_nan_and_inference_mode)."""
    _on_emulated_kernels(monkeypatch, raa_ops)
    for base in ("gelu", "relu"):
        raa = _raa(8, base=base, scale=0.0)                    # v = 0: dL/dx of the NaN is ReLU's own
        x = _in_layout(torch.randn(2, 8, 3, 3), "channels_last")
        assert_nan_and_inference_mode(raa, x)


def _arr_on(monkeypatch, emulated):
    """ARR's loss through the emulated CUDA operator (None: the PyTorch operators)."""
    from bionets.layers import arr
    monkeypatch.setattr(arr, "_own_operator", lambda *args: emulated)


@pytest.mark.parametrize("classes, dim", [(10, 64), (1000, 40), (3000, 8)])
@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("layers", [1, 2])
def test_arr_cuda_operator_matches_the_pytorch_operators(arr_ops, layers, form, classes, dim, monkeypatch):
    """ARR's CUDA operator against the PyTorch operators over three batches, classes appearing for the
    first time in later batches: the loss, dL/dr, the class means and the seen flags. One layer of
    10 classes and 64 features is one block, which sums the loss itself; 3000 classes leave room for
    2 features a block, so 4 blocks a layer share its seen flags (written into a copy)."""
    from bionets.layers.arr import ArrMemory, arr_loss
    torch.manual_seed(0)
    memories = [ArrMemory(3, classes, dim) for _ in range(2)]
    for step in range(3):
        y = torch.randint(0, min(classes, 5 + 3 * step), (45,))          # (not a multiple of the kernel's 8)
        responses = [torch.randn(45, dim) for _ in range(layers)]
        diff = loop_loss(memories[1].mean, memories[1].seen, torch.stack(responses), y, 0.1, 2.0, form)[3]
        results = []
        for memory, emulated in zip(memories, (arr_ops, None)):
            _arr_on(monkeypatch, emulated)
            arr_ops.set_seed(step)
            r = [t.clone().requires_grad_() for t in responses]
            loss = arr_loss(memory, r, y, weight=2.0, momentum=0.1, form=form)
            loss.backward()
            results.append((loss.detach(), [t.grad for t in r]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        for j in range(layers):                 # 2 / numel * sign(r - t) through both, t in float64
            for grads in (results[0][1], results[1][1]):
                assert_sign_gradient(grads[j], diff[j], 2.0 / diff.numel())
        torch.testing.assert_close(memories[0].mean, memories[1].mean, rtol=1e-5, atol=1e-5)
        assert torch.equal(memories[0].seen, memories[1].seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_arr_cuda_operator_in_half_precision_twice_and_with_a_stray_class(arr_ops, dtype, monkeypatch):
    """Half-precision responses are read as they are: the loss and the means as from their float32
    values, gradients in their dtype, the same bits in another block and thread order; a class
    outside the memory adds nothing and is not learnt (the PyTorch path refuses it on the CPU)."""
    from bionets.layers.arr import ArrMemory, arr_loss
    torch.manual_seed(0)
    y = torch.randint(0, 10, (64,))
    base = [torch.randn(64, 33).to(dtype) for _ in range(2)]
    results = []
    for emulated, seed, as_float in ((None, 0, True), (arr_ops, 0, False), (arr_ops, 1, False)):
        _arr_on(monkeypatch, emulated)
        arr_ops.set_seed(seed)
        memory = ArrMemory(2, 10, 33)
        r = [(t.float() if as_float else t.clone()).requires_grad_() for t in base]
        loss = arr_loss(memory, r, y, weight=1.0, momentum=0.1)
        loss.backward()
        results.append((loss.detach(), memory.mean.clone(), [t.grad for t in r]))
        assert all(t.grad.dtype == (torch.float32 if as_float else dtype) for t in r)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[1][0], results[2][0]) and torch.equal(results[1][1], results[2][1])
    assert all(torch.equal(a, b) for a, b in zip(results[1][2], results[2][2]))
    memory = ArrMemory(1, 10, 33)
    stray = y.clone()
    stray[5] = 12                                         # no class 12: nothing to pull towards
    r = base[0].float().requires_grad_()
    loss = arr_ops.arr_loss(r.unsqueeze(0), stray, memory.mean, memory.seen, 0.1, 1.0, False, True)
    loss.backward()
    assert not r.grad[5].any() and r.grad.abs().sum() > 0 and loss.item() > 0
    assert memory.seen.sum() == len(set(stray.tolist()) - {12})


def test_rewritten_sources_keep_every_launch_and_registration():
    """The rewriting for the emulation finds what it must change, or says so (a new launch syntax or
    library name in a kernel source would otherwise build something else than the GPU runs)."""
    import cuda_emulated
    assert "cuda_emu::launch(1, 2, k2, a)" in cuda_emulated.kernels_source("k2 <<<1, 2>>>(a);")   # (no template)
    with pytest.raises(RuntimeError, match="2 of 3 kernel launches"):
        cuda_emulated.kernels_source("k<T><<<1, 2, 0, s>>>(a);\nk2 <<<1, 2>>>(a);\n(*k3)<<<1, 2>>>(a);")
    with pytest.raises(RuntimeError, match="not all renamed"):
        cuda_emulated.operators_source("TORCH_LIBRARY(bionets_x, m) {}\nTORCH_LIBRARY_IMPL(bionets_x, CUDA, m) {}", "y")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """tests/cuda_emulation_selftest.cpp built against c10 (about 2 s)."""
    import subprocess
    from pathlib import Path

    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch.utils import cpp_extension
    here = Path(__file__).parent
    exe = tmp_path_factory.mktemp("emulation") / "selftest"
    lib = cpp_extension.library_paths()[0]
    includes = [flag for path in cpp_extension.include_paths() for flag in ("-I", path)]
    built = subprocess.run([get_cpp_compiler(), "-std=c++17", "-O1", "-I", str(here), *includes,
                            str(here / "cuda_emulation_selftest.cpp"), "-o", str(exe), f"-L{lib}", "-lc10",
                            f"-Wl,-rpath,{lib}"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return lambda case, seed=0: subprocess.run([str(exe), case, str(seed)], capture_output=True, text=True)


@pytest.mark.parametrize("case,error", [
    ("block_sum", None),
    ("lanes_return_after_their_last_shuffle", None),
    ("shuffle_with_returned_lane", "lane 0 shuffles with lane 1, which has returned"),
    ("shuffle_past_the_warp", "lane mask 32, outside 0..31"),
    ("shuffle_past_the_block", "a lane past the block's threads"),
    ("barrier_and_shuffle_in_one_warp", "wait at barriers that cannot open"),
])
def test_the_emulator_runs_correct_kernels_and_refuses_broken_ones(selftest, case, error):
    """The emulator itself, in three thread orders: a warp-shuffle and shared-memory block sum gives
    each block's sum; lanes that return after their last shuffle while their partners still read are
    no error; kernels that read a lane which has returned, shuffle past the block, or split a warp
    between __syncthreads and a shuffle (a deadlock on a GPU) are each refused, and so is a lane mask
    outside 0..31 (a GPU takes its low 5 bits; here it is taken as a bug)."""
    want = {"block_sum": ["189", "190", "191"],             # sum(i % 7) over each block's 64
            "lanes_return_after_their_last_shuffle": ["4", "0", "4", "3040"]}
    for seed in (0, 1, 2):
        run = selftest(case, seed)
        if error is None:
            assert run.returncode == 0 and run.stdout.split() == want[case], run.stdout + run.stderr
        else:
            assert run.returncode == 3 and error in run.stdout, run.stdout + run.stderr
