"""RAA's fused C++ kernels for float32 CPU tensors against the direct formula in float64, in every
layout they take, and the PyTorch path where they cannot be built."""
import copy
import pickle

import pytest
import torch

import bionets.layers.cpu_kernels as cpu_kernels
import bionets.layers.raa as raa_module
from bionets.errors import BionetsError
from bionets.layers.raa import RAA
from compile_helpers import own_cpu_kernels
from test_raa import LAYOUTS, direct, randomized


@pytest.fixture
def kernels():
    """RAA's CPU kernels, built (the fallback and CUDA tests here run without them)."""
    return own_cpu_kernels("raa_cpu")


# (shape, feature dim): C below, at and above a vector register, odd sizes that leave tails, maps larger
# than one chunk of 256 vectors (threads split them), tokens
SHAPES = [((3, 5, 4, 6), 1), ((2, 16, 9, 9), 1), ((2, 32, 5, 5), 1), ((4, 37, 11, 13), 1), ((2, 64, 8, 8), 1), ((33, 1, 3, 3), 1),
          ((2, 7, 5), -1), ((3, 300, 40), -1), ((5, 20), -1)]


def _grads(raa, x, dim, g):
    out = raa(x)
    return (out, *torch.autograd.grad(out, (x, *raa.parameters()), g))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("variant", ["vector", "scalar"])
@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_kernels_match_formula_float64(variant, base, layout):
    """Output and every gradient within float32 rounding of the float64 formula: a relative error
    below 1e-4 of each tensor's largest entry (1e-7 to 2e-6 measured, as the PyTorch path in float32;
    dL/dc sums thousands of terms of both signs)."""
    torch.manual_seed(0)
    for shape, dim in SHAPES:
        if dim == -1 and layout != "contiguous":
            continue
        raa = randomized(RAA(shape[dim], variant, base))
        x = LAYOUTS[layout](torch.randn(*shape)).requires_grad_()
        assert raa_module._cpu_kernels(x, raa.shift_params, dim) is not None
        g = torch.randn(shape)
        got = _grads(raa, x, dim, g)
        raa64 = RAA(shape[dim], variant, base).double()
        raa64.load_state_dict(raa.state_dict())
        x64 = x.detach().double().requires_grad_()
        out64 = direct(x64, raa64, dim)
        want = (out64, *torch.autograd.grad(out64, (x64, *raa64.parameters()), g.double()))
        assert got[0].stride() == x.stride()
        for a, b in zip(got, want):
            assert a.dtype == torch.float32
            err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)
            assert err < 1e-4, (shape, err)


@pytest.mark.usefixtures("kernels")
def test_cpu_kernels_take_a_gradient_in_another_layout():
    """A gradient arriving NCHW for a channels_last map (or the other way) is read correctly."""
    torch.manual_seed(0)
    raa = randomized(RAA(12))
    for fmt, other in [(torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)]:
        x = torch.randn(2, 12, 5, 7).contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(2, 12, 5, 7)
        want = torch.autograd.grad(raa(x), x, g.contiguous(memory_format=fmt))[0]
        got = torch.autograd.grad(raa(x), x, g.contiguous(memory_format=other))[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.usefixtures("kernels")
def test_cpu_kernels_edge_values():
    """z = x + shift = 0 gives Phi = 1/2 exactly; huge |z| gives 0 or x; a NaN shift gives NaN."""
    raa = RAA(4)
    with torch.no_grad():
        raa.c.fill_(0.5)
    x = torch.tensor([[-0.5, 1.0, -0.5, 0.0], [-0.5, -0.5, 2.0, 1e30], [-1e30, 3.0, 0.0, 0.0]]).view(3, 4)
    out = raa(x)
    assert out[0, 0].item() == -0.25 and out[0, 2].item() == -0.25
    assert out[1, 3].item() == x[1, 3].item() and out[2, 0].item() == 0.0
    with torch.no_grad():
        raa.c.fill_(float("nan"))
    assert raa(x).isnan().all()


@pytest.mark.usefixtures("kernels")
def test_cpu_kernels_give_the_same_result_on_any_number_of_threads():
    """dL/dv and dL/dc are summed over fixed chunks of vectors, so the result does not depend on how
    many threads split the map (a run is reproducible from one machine to the next)."""
    torch.manual_seed(0)
    raa = randomized(RAA(16))
    x = torch.randn(8, 16, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(raa, x, 1, torch.ones(8, 16, 16, 16)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_switched_off_or_unbuildable_kernels_leave_the_pytorch_path(monkeypatch):
    """BIONETS_CPU_KERNELS=0 uses the PyTorch path without trying; where the build fails (no compiler),
    one warning names why and RAA gives the same values through the PyTorch path. (Each case takes
    a copy of the module, as a fresh process would: a module keeps the operator its last call chose.)"""
    torch.manual_seed(0)
    raa = randomized(RAA(6))
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    want = _grads(raa, x, 1, torch.ones(3, 6, 4, 4))

    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("BIONETS_CPU_KERNELS", "0")
    assert raa_module._cpu_kernels(x, raa.vc, 1) is None
    torch.testing.assert_close(_grads(copy.deepcopy(raa), x, 1, torch.ones(3, 6, 4, 4)), want, rtol=1e-5, atol=1e-6)

    tried = []

    def broken(name):
        tried.append(name)
        raise RuntimeError(f"building bionets_{name}: c++: command not found\nmore lines")

    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("BIONETS_CPU_KERNELS", "1")
    monkeypatch.setattr(cpu_kernels, "build", broken)
    with pytest.warns(UserWarning, match="CPU kernels cannot be built here.*command not found.*PyTorch path"):
        got = _grads(copy.deepcopy(raa), x, 1, torch.ones(3, 6, 4, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert cpu_kernels.ops("raa_cpu") is None and tried == ["raa_cpu"]        # tried once, not at every call


@pytest.mark.usefixtures("kernels")
def test_a_module_rechooses_its_path_when_a_call_differs_from_the_last():
    """A module remembers its last eager call's shape, strides and dtypes with the operator it chose
    (~15 us a call less of Python here); a call that differs in any of them is checked and routed
    afresh: the C++ operator for channels_last float32, the PyTorch path for float64 and for a
    parameter cast to float64, an error for a wrong width. Copies and pickles leave the memory out."""
    torch.manual_seed(0)
    raa = randomized(RAA(8))
    x = torch.randn(2, 8, 3, 5)
    calls = [x.contiguous(memory_format=torch.channels_last), x.double(), x.contiguous(memory_format=torch.channels_last),
             x[:1].contiguous(memory_format=torch.channels_last), x]
    for xin in calls:
        out = raa(xin.requires_grad_())
        kernel = "RaaBackward" in out.grad_fn.name()
        assert kernel == (xin.dtype == torch.float32), (xin.dtype, xin.stride())
        want = direct(xin.detach().double(), copy.deepcopy(raa).double(), 1)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        raa.vc.data = raa.vc.data.double()        # a parameter's dtype changed in place: no operator
    out = raa(calls[0].detach())
    assert "RaaBackward" not in out.grad_fn.name()
    raa.vc.data = raa.vc.data.float()
    with pytest.raises(BionetsError, match="RAA built for 8 features got a tensor of shape"):
        raa(torch.randn(2, 9, 3, 5))
    assert raa._route is not None
    assert copy.deepcopy(raa)._route is None and pickle.loads(pickle.dumps(raa))._route is None


@pytest.mark.usefixtures("kernels")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_remembered_route_gives_way_to_transforms_tracing_and_a_new_axis():
    """After an eager call has set the module's route, a call with the same shape and strides takes
    the plain expression under forward-mode AD and torch.jit.trace (the C++ operator has no forward
    derivative; a trace would record it), reads the features on the new axis after ``dim`` changes,
    and takes another device's path for the same map on it; under torch.func.vmap (its calls of
    another shape) the values are the formula's too."""
    from torch.autograd import forward_ad

    torch.manual_seed(0)
    raa = randomized(RAA(8))
    x = torch.randn(2, 8, 3, 8).contiguous(memory_format=torch.channels_last)
    assert "RaaBackward" in raa(x.requires_grad_()).grad_fn.name() and raa._route is not None
    x = x.detach()
    want = direct(x.double(), copy.deepcopy(raa).double(), 1)
    got = torch.func.vmap(lambda t: raa(t.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    tangent = torch.randn_like(x)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(raa(forward_ad.make_dual(x, tangent)))
    torch.testing.assert_close(out.primal.double(), want, rtol=1e-5, atol=1e-6)
    assert out.tangent is not None
    traced = torch.jit.trace(raa, x, check_trace=False)
    assert "bionets_raa" not in str(traced.inlined_graph)
    raa(x)                                            # the route again
    raa.dim = -1                                      # the same map, its features now on the last axis
    torch.testing.assert_close(raa(x).double(), direct(x.double(), copy.deepcopy(raa).double(), -1),
                               rtol=1e-5, atol=1e-6)
    raa.dim = None
    raa(x)                                            # the route again
    assert raa.to("meta")(x.to("meta")).device.type == "meta"     # the same map on another device: re-routed


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("variant", ["vector", "scalar"])
def test_cpu_kernels_read_and_write_bf16(base, variant):
    """bf16 maps with contiguous features (channels_last, tokens; what CPU bf16 autocast gives RAA)
    go through the kernels in bf16 without a float32 copy: the output and dL/dx are the float32
    kernels' on the same bf16 values, rounded once (relative error within bf16's 2^-8), dL/dv and
    dL/dc the float32 ones; an NCHW bf16 map takes the float32 copy and gives the same."""
    torch.manual_seed(0)
    for shape, dim, fmt in [((4, 16, 6, 6), 1, torch.channels_last), ((3, 20, 5, 7), 1, torch.channels_last),
                            ((2, 9, 33), -1, None), ((3, 16, 4, 4), 1, torch.contiguous_format)]:
        raa = randomized(RAA(shape[dim], variant, base))
        x = torch.randn(shape).bfloat16()
        g = torch.randn(shape).bfloat16()
        if fmt is not None:
            x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
        direct_ok = raa_module._cpu_kernels(x, raa.shift_params, dim) is not None
        assert direct_ok == (fmt != torch.contiguous_format)
        got = _grads(raa, x.requires_grad_(), dim, g)
        want = _grads(raa, x.detach().float().requires_grad_(), dim, g.float())
        assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[1].stride() == x.stride()
        for a, b in zip(got[:2], want[:2]):
            assert ((a.float() - b).abs().max() / b.abs().max()) < 2 ** -8
        for a, b in zip(got[2:], want[2:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("kernels")
def test_a_nan_stays_in_its_element_with_a_scalar_shift():
    """With a scalar shift dL/dx_j depends on x_j alone: one NaN input gives one NaN gradient, also in
    the kernels' any-width loop (C = 5, not a multiple of the vector width), where 0 * NaN spread it."""
    for layout in ("tokens", "channels_last"):
        raa = RAA(5, "scalar", dim=-1 if layout == "tokens" else 1)
        x = torch.randn(2, 5) if layout == "tokens" else torch.randn(2, 5, 3, 3).contiguous(memory_format=torch.channels_last)
        x[(0, 1) if layout == "tokens" else (0, 1, 2, 0)] = float("nan")
        x.requires_grad_()
        raa(x).sum().backward()
        assert torch.isnan(x.grad).sum().item() == 1, layout


@pytest.mark.usefixtures("kernels")
@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_raa_is_one_operator_whose_autograd_is_cpp():
    """Where the kernels take x, one RAA call is one operator with a C++ backward node (a Python
    autograd function around the same kernels took ~48 us a call more here, a C++ autograd function
    ~15 us); in inference mode the same operator runs without autograd; with
    the parameters frozen, or x not needing a gradient, the gradients that are asked for match, and
    so do those through saved-tensor hooks, a retained graph's second backward and anomaly mode; an
    input changed in place after the call is refused at the backward, as PyTorch's own operators
    refuse it; a w of another size, dtype or layout than [v | c] or [c] is refused."""
    torch.manual_seed(0)
    raa = randomized(RAA(10))
    x = torch.randn(3, 10, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = raa(x)
    assert "RaaBackward" in out.grad_fn.name()
    with torch.inference_mode():
        torch.testing.assert_close(raa(x), out.detach(), rtol=0, atol=0)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, raa.vc), g)
    raa.requires_grad_(False)
    torch.testing.assert_close(torch.autograd.grad(raa(x), x, g)[0], gx, rtol=0, atol=0)
    raa.requires_grad_(True)
    torch.testing.assert_close(torch.autograd.grad(raa(x.detach()), raa.vc, g)[0], gw, rtol=0, atol=0)
    op = cpu_kernels.ops("raa_cpu").raa.default               # w: [v | c] of 11 entries, or [c]; nothing else
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or ("packed", t), lambda p: p[1]):
        hooked = raa(x)                                       # (x, w and the shifts through the hooks)
    assert packed == [x.shape, raa.vc.shape, (3 * 5 * 4,)]
    torch.testing.assert_close(torch.autograd.grad(hooked, (x, raa.vc), g), (gx, gw), rtol=0, atol=0)
    again = raa(x)
    first = torch.autograd.grad(again, (x, raa.vc), g, retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(again, (x, raa.vc), g), first, rtol=0, atol=0)
    with torch.autograd.detect_anomaly():
        torch.testing.assert_close(torch.autograd.grad(raa(x), (x, raa.vc), g), (gx, gw), rtol=0, atol=0)
    base = x * 1
    y = raa(base)
    with torch.no_grad():
        base.add_(1)                                          # a saved input changed in place after the call
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    for w in (torch.zeros(10), torch.zeros(11, dtype=torch.float64), torch.zeros(22)[::2], torch.zeros(1, 11)):
        with pytest.raises(RuntimeError, match=r"w must be a contiguous float32 vector \[v \| c\]"):
            op(x, w, 1, False)


def test_cuda_kernels_are_skipped_silently_without_nvcc_and_warn_once_where_the_build_fails(monkeypatch, recwarn):
    """RAA's CUDA C++ kernels need nvcc, which torch's wheels do not bring: without it (or with
    BIONETS_CUDA_KERNELS=0) no build is tried and nothing is said (the Triton kernels serve); a
    failing build warns once and is not tried again. Each GPU's compute capability gets its own
    machine code, and the build's name changes with them; a second build in one process, which
    would abort it, is refused."""
    from bionets.layers import cuda_kernels
    tried, real_build = [], cuda_kernels.build

    def broken(name):
        tried.append(name)
        raise RuntimeError("building bionets_raa_cuda failed: nvcc fatal: Unsupported gpu architecture")

    monkeypatch.setattr(cuda_kernels, "build", broken)
    for env, toolkit in [("0", True), ("1", False)]:
        monkeypatch.setattr(cuda_kernels, "_STATE", {})
        monkeypatch.setenv("BIONETS_CUDA_KERNELS", env)
        monkeypatch.setattr(cuda_kernels, "has_cuda_toolkit", lambda: toolkit)
        assert cuda_kernels.ops("raa_cuda") is None
    assert not tried and not recwarn.list
    monkeypatch.setattr(cuda_kernels, "_STATE", {})
    monkeypatch.setattr(cuda_kernels, "has_cuda_toolkit", lambda: True)
    with pytest.warns(UserWarning, match="CUDA kernels cannot be built here.*Unsupported gpu.*Triton kernels"):
        assert cuda_kernels.ops("raa_cuda") is None
    assert cuda_kernels.ops("raa_cuda") is None and tried == ["raa_cuda"]
    assert cuda_kernels.arch_flags([(9, 0), (8, 0), (9, 0)]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    h100, a100 = cuda_kernels.extension_name("raa_cuda", [(9, 0)]), cuda_kernels.extension_name("raa_cuda", [(8, 0)])
    assert h100.startswith("bionets_raa_cuda_sm90_") and a100.startswith("bionets_raa_cuda_sm80_") and h100[-10:] != a100[-10:]
    monkeypatch.setattr(cuda_kernels, "nvcc_version", lambda home: "Build cuda_99.0")     # another nvcc: another build
    other_nvcc = cuda_kernels.extension_name("raa_cuda", [(9, 0)])
    assert other_nvcc != h100
    # the same torch version installed elsewhere (another venv): builds of their own, not one rebuilt by turns
    from bionets.layers import cpu_kernels
    cpu_name = cpu_kernels.extension_name("raa_cpu")[0]
    monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    assert cpu_kernels.extension_name("raa_cpu")[0] != cpu_name
    assert cuda_kernels.extension_name("raa_cuda", [(9, 0)]) != other_nvcc
    # a second build into a process that holds one would abort it (the operators registered twice): refused
    import types
    monkeypatch.setattr(torch.ops, "bionets_raa_cuda", types.SimpleNamespace(raa=object()), raising=False)
    monkeypatch.setattr(cuda_kernels.cpu_kernels, "compile_extension", lambda *args, **kwargs: tried.append("compiled"))
    with pytest.raises(RuntimeError, match="another build of bionets_raa_cuda is loaded"):
        real_build("raa_cuda", [(8, 0)])
    assert tried == ["raa_cuda"]                  # nothing compiled


def test_the_build_line_comes_from_torchruns_first_process_on_a_machine_only(monkeypatch, capsys, tmp_path):
    """Every torchrun process builds (or waits for) the kernels; only LOCAL_RANK 0 says so."""
    from torch.utils import cpp_extension
    from bionets.layers import cpu_kernels
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: f"/usr/bin/{name}")     # a compiler or not
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        cpu_kernels.compile_extension("bionets_nothing", [], "nothing", "no time")
        assert ("building nothing" in capsys.readouterr().err) == said


@pytest.mark.parametrize("name, operators", [("raa_cuda", ("raa", "forward", "backward")), ("arr_cuda", ("arr_loss",))])
def test_cuda_sources_compile_where_a_cuda_toolkit_is_installed(name, operators):
    """RAA's and ARR's CUDA C++ sources build and register their operators for two compute capabilities
    (Ampere, Hopper) on any machine with a CUDA toolkit, GPU or not (about a minute on 2 cores the
    first time, then cached); machines without one skip this."""
    import subprocess
    import sys
    from bionets.layers import cuda_kernels
    if not cuda_kernels.has_cuda_toolkit():
        pytest.skip("no CUDA toolkit (nvcc and CUDA's headers) that torch's builder finds")
    # in a process of its own: a GPU machine's tests may have loaded the build for its own GPU, and
    # a second library of the same operators cannot load into one process
    code = (f"from bionets.layers import cuda_kernels; ops = cuda_kernels.build({name!r}, [(8, 0), (9, 0)]); "
            f"print(all(hasattr(ops, op) for op in {operators!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


@pytest.mark.usefixtures("kernels")
def test_second_derivative_path_of_a_bf16_map_computes_the_shift_in_float32():
    """Under create_graph the operator differentiates the plain expression, whose float32 parameters
    promote a bf16 map, as raa_expression does: dL/dv and dL/dc as the first-order kernels give them
    (a shift rounded to bf16 put dL/dc 0.8% off)."""
    torch.manual_seed(0)
    raa = randomized(RAA(16))
    x = torch.randn(4, 16, 5, 5).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(4, 16, 5, 5).bfloat16().contiguous(memory_format=torch.channels_last)
    first = torch.autograd.grad(raa(x), raa.vc, g)[0]
    second = torch.autograd.grad(raa(x), raa.vc, g, create_graph=True)[0]
    for a, b in ((second[:-1], first[:-1]), (second[-1:], first[-1:])):         # dL/dv, dL/dc
        assert a.dtype == b.dtype == torch.float32 and ((a - b).abs().max() / b.abs().max()).item() < 1e-4


@pytest.mark.usefixtures("kernels")
def test_the_operator_under_compiled_autograd_and_forward_ad():
    """Compiled autograd (torch._dynamo's traced backward) runs the operator's C++ backward as one
    opaque call, to the eager gradients; the operator itself refuses forward-mode AD in one line (the
    module computes its plain expression there)."""
    from torch._dynamo import compiled_autograd
    from torch.autograd import forward_ad

    torch.manual_seed(0)
    raa = randomized(RAA(8, base="relu"))
    x = torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    want = torch.autograd.grad(raa(x), (x, raa.vc), g)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        raa(x).backward(g)
    torch.testing.assert_close((x.grad, raa.vc.grad), want, rtol=0, atol=0)
    op = cpu_kernels.ops("raa_cpu").raa.default
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="RAA operator: no forward-mode derivative"):
        op(forward_ad.make_dual(x.detach(), g), raa.vc.detach(), 1, True)
