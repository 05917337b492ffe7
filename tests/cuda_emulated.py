"""bionets' CUDA C++ kernels (``raa_cuda``, ``arr_cuda``) built for the CPU, for tests on machines
without a GPU: each ``.cu`` source, rewritten mechanically for ``cuda_emulation.h`` (which runs a
block's threads as fibers), and its ``.cpp`` operators registered for CPU tensors as
``torch.ops.bionets_<name>_emu``, autograd in C++ as on CUDA. So the kernels' indexing, shuffles,
barriers, scratch layout, block-order sums and operator wiring run as written; the GPU's memory
model, timing and speed do not (see the header)."""
from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
LAYERS = HERE.parent / "bionets" / "layers"
HEADER = HERE / "cuda_emulation.h"

# RAA's CUDA kernels' test cases, emulated and on a GPU (test_cuda.py): (shape, feature dim, layout).
# The rows kernels (16-byte chunks; in float32 with 24, 64, 100 and 256 features) with groups of 2
# to 32 threads a vector and 1 or 4 chunks a thread; the element kernels with one thread a vector
# (NCHW), groups of 2 to 32 threads, several passes of a group over the features, fewer than 8
# groups a block (1500 features); more vectors than the backward's fixed grid takes at once (tokens;
# NCHW, 126 vectors a block), one pixel (NCHW maps of more than 64 channels take the Triton kernels),
# partial sums too many to keep in the forward's buffer (NCHW 64 channels: 1024 blocks x 65;
# 256-wide tokens: 512 x 257), which the backward allocates and the column-sum kernel sums
RAA_CUDA_CASES = [((5, 24, 7, 9), 1, "nchw"), ((5, 24, 7, 9), 1, "channels_last"), ((5, 9, 24), -1, "tokens"),
                  ((3, 3, 5, 5), 1, "channels_last"), ((2, 100, 6, 6), 1, "channels_last"), ((2, 64, 6, 6), 1, "nchw"),
                  ((40, 300, 24), -1, "tokens"), ((4, 65, 768), -1, "tokens"), ((3, 16, 1, 1), 1, "nchw"),
                  ((6, 7, 2), -1, "tokens"), ((3, 6, 5, 7), 1, "channels_last"), ((2, 3, 1500), -1, "tokens"),
                  ((60, 64, 48, 48), 1, "nchw"), ((8, 1024, 256), -1, "tokens")]

LAUNCH = re.compile(r"(\w+(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\(", re.S)     # (a template kernel's arguments too)


def kernels_source(cu: str) -> str:
    """A ``.cu`` source as C++ for ``cuda_emulation.h``."""
    body, launches = LAUNCH.subn(r"cuda_emu::launch(\2, \1, ", cu)
    if launches != cu.count("<<<"):
        raise RuntimeError(f"rewrote {launches} of {cu.count('<<<')} kernel launches")
    body = re.sub(r"#include <c10/cuda/[^>]+>\n", "", body)
    body = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = cuda_emu::dynamic_shared<\1>();", body)
    body = re.sub(r"__shared__ (\w+) (\w+(\[\w+\])?);", r"static thread_local \1 \2;", body)
    body = body.replace(".is_cuda()", ".is_cpu()").replace("#pragma unroll\n", "\n")
    return f'#include "{HEADER.name}"\n' + body


def operators_source(cpp: str, name: str) -> str:
    """A ``.cpp`` source's operators as ``bionets_<name>_emu`` for CPU tensors, and ``set_seed``."""
    lib = f"bionets_{name}"
    body = re.sub(rf"TORCH_LIBRARY_IMPL\({lib}, CUDA,", f"TORCH_LIBRARY_IMPL({lib}_emu, CPU,", cpp)
    body = re.sub(rf"TORCH_LIBRARY_IMPL\({lib}, AutogradCUDA,", f"TORCH_LIBRARY_IMPL({lib}_emu, AutogradCPU,", body)
    body = body.replace(f"TORCH_LIBRARY({lib},", f"TORCH_LIBRARY({lib}_emu,")
    registrations = re.findall(r"TORCH_LIBRARY\w*\((\w+)", body)
    if len(registrations) < 3 or set(registrations) != {f"{lib}_emu"}:
        raise RuntimeError(f"{name}.cpp: its library's registrations were not all renamed")
    return (f'#include "{HEADER.name}"\n' + body + f"\nTORCH_LIBRARY_FRAGMENT({lib}_emu, m) {{\n"
            '  m.def("set_seed(int seed) -> ()",\n'
            '        [](int64_t seed) { cuda_emu::set_seed(static_cast<uint64_t>(seed)); });\n}\n')


_BUILT: dict[str, object] = {}


def _write_if_changed(path: Path, text: str) -> None:
    """Leave an identical source untouched (its mtime is what torch's builder checks, so a rewrite
    would rebuild in every process) and replace a changed one whole, so that a concurrent run reads
    either the old text or the new one, never half of it."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def extension(name: str) -> tuple[str, dict[str, str]]:
    """(the build's name, its sources' file names and texts): the name carries a hash of the texts
    and the headers they include."""
    texts = {f"{name}_emu_kernels.cpp": kernels_source((LAYERS / f"{name}.cu").read_text()),
             f"{name}_emu_ops.cpp": operators_source((LAYERS / f"{name}.cpp").read_text(), name)}
    key = hashlib.sha256("".join(texts.values()).encode() + HEADER.read_bytes()
                         + b"".join(p.read_bytes() for p in sorted(LAYERS.glob("*.h")))).hexdigest()[:10]
    return f"bionets_{name}_emu_{key}", texts


def ops(name: str):
    """``torch.ops.bionets_<name>_emu``, built once per source (cached by torch's builder)."""
    if name not in _BUILT:
        from bionets.layers import cpu_kernels
        from bionets.toolchain import quiet_import
        quiet_import()
        from torch.utils import cpp_extension
        ext, texts = extension(name)
        where = Path(cpp_extension.get_default_build_root()) / f"{ext}_src"
        where.mkdir(parents=True, exist_ok=True)
        for file, text in texts.items():
            _write_if_changed(where / file, text)
        cpu_kernels.compile_extension(ext, [where / f for f in texts], f"{name} emulated on the CPU", "~20 s",
                                      extra_include_paths=[str(HERE), str(LAYERS)], extra_cflags=["-O2"])
        _BUILT[name] = getattr(torch.ops, f"bionets_{name}_emu")
    return _BUILT[name]


def assert_backward_twice_and_interleaved(raa: torch.nn.Module, xs: list[torch.Tensor]) -> None:
    """RAA's CUDA backward keeps its block counter and partial sums in the forward's saved buffer: a
    retained graph's second backward must give its first one's bits (the last block zeroes the
    counter again), and two graphs' backward passes, run in the other order than their forwards,
    each what their graph alone gives."""
    params = (raa.shift_params,)
    alone = [torch.autograd.grad(raa(x), params, torch.ones_like(x)) for x in xs]
    out = raa(xs[0])
    first = torch.autograd.grad(out, params, torch.ones_like(out), retain_graph=True)
    second = torch.autograd.grad(out, params, torch.ones_like(out))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, alone[0]))
    outs = [raa(x) for x in xs]
    for k in (1, 0):
        got = torch.autograd.grad(outs[k], params, torch.ones_like(outs[k]))
        assert all(torch.equal(a, b) for a, b in zip(got, alone[k]))


def assert_nan_and_inference_mode(raa: torch.nn.Module, x: torch.Tensor) -> None:
    """RAA (its parameters zero) on x [2, 8, 3, 3] with one NaN: inference mode runs the operator
    without autograd to the same values; the NaN makes its pixel's shift and outputs NaN in both
    forms (max(0, NaN) stays NaN, as in ReLU), and the ReLU form's gradient passes it as
    threshold_backward does."""
    x[0, 3, 1, 1] = float("nan")
    xg = x.clone().requires_grad_()
    out = raa(xg)
    with torch.inference_mode():
        torch.testing.assert_close(raa(x), out.detach(), rtol=0, atol=0, equal_nan=True)
    assert out[0, :, 1, 1].isnan().all() and out.isnan().sum() == 8
    out.backward(torch.ones_like(out))
    if raa.base == "relu":
        assert xg.grad[0, 3, 1, 1] == 1


def assert_misaligned_like_aligned(op, device: str) -> None:
    """RAA's rows kernels read 16 bytes at a time from 16-byte aligned tensors: tokens that start one
    element into their storage, and a gradient so placed, take the element kernels (and a copy of
    the gradient) through ``op`` (the operator ``raa``), with the aligned tensors' results to
    rounding, in float32 and bf16; so does an x saved aligned that a saved-tensor hook gives back
    misaligned (the forward sized the backward's scratch for both kernel families)."""
    torch.manual_seed(0)
    n, width = 300, 64
    w = torch.randn(width + 1, device=device) * 0.2                     # [v | c]

    def shifted(t):                       # t's values, one element into a fresh storage
        return torch.cat([t.new_zeros(1), t.flatten()])[1:].view_as(t)

    def run(x, g):
        leaves = [t.detach().requires_grad_() for t in (x, w)]
        y = op(*leaves, -1, False)
        return (y, *torch.autograd.grad(y, leaves, g))

    def run_unaligned_on_unpack(x, g):      # x saved aligned, given back to the backward one element in
        def unpack(t):
            return shifted(t) if t.shape == x.shape and t.dtype == x.dtype else t
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            return run(x, g)

    for dtype in (torch.float32, torch.bfloat16):
        x, g = (torch.randn(n, width, device=device).to(dtype) for _ in range(2))
        aligned = run(x, g)
        for xs, gs in ((shifted(x), g), (x, shifted(g)), (shifted(x), shifted(g))):
            assert xs.data_ptr() % 16 or gs.data_ptr() % 16
            for a, b in zip(run(xs, gs), aligned):
                rtol = 1e-5 if a.dtype == torch.float32 else 2 ** -7          # (bf16 y, dL/dx: one unit of rounding)
                torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=1e-5 * max(b.abs().max().item(), 1.0))
        for a, b in zip(run_unaligned_on_unpack(x, g), aligned):
            rtol = 1e-5 if a.dtype == torch.float32 else 2 ** -7
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=1e-5 * max(b.abs().max().item(), 1.0))
