"""The CUDA paths written as Triton kernels (RAA; the quadratic layer's 'fused' strategy, CUDA's default),
checked on the CPU by Triton's interpreter in a subprocess (the interpreter is chosen when the
kernels are defined, so it needs its own process)."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def test_triton_kernels_match_autograd_of_the_float64_formulas():
    script = Path(__file__).with_name("triton_interpreted.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checked 16 ARR cases" in done.stdout
    assert "checked 16 RAA cases" in done.stdout and "checked 6 quadratic cases" in done.stdout
    assert "checked the compiled quadratic operator" in done.stdout


def test_cpu_tensors_take_the_pytorch_path():
    from bionets.layers.raa import _triton_layout
    assert _triton_layout(torch.randn(2, 4, 3, 3), 1) is None


def test_kernels_launch_on_their_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device; a tensor on another one (a single-process run on
    cuda:1) switches to its own device for the launch, and only then (no GPU here: the device calls
    are recorded)."""
    from bionets.layers.triton_kernels import launch_device
    switched = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: switched.append(d) or contextlib.nullcontext())

    class OnGpu:
        is_cuda = True

        def __init__(self, index):
            self.device = torch.device("cuda", index)

    for t in (OnGpu(0), torch.zeros(1), OnGpu(1)):
        with launch_device(t):
            pass
    assert switched == [torch.device("cuda:1")]


def test_cuda_strategy_switch_names_the_choices_and_auto_picks_outer_then_fused_by_width(monkeypatch):
    from bionets.errors import BionetsError
    from bionets.layers import quadratic
    with pytest.raises(BionetsError, match="auto.*blocks.*fused.*gather.*outer"):
        quadratic.set_cuda_strategy("xyzzy")
    assert quadratic._CUDA_STRATEGY == "auto"
    gpu = torch.device("cuda:0")
    monkeypatch.setitem(quadratic._FUSED_WORKS, str(gpu), True)      # as if the kernels had built there
    outer, widest = quadratic.OUTER_MAX_CHANNELS, quadratic.FUSED_MAX_CHANNELS
    assert [quadratic._cuda_strategy(c, gpu) for c in (16, outer, outer + 1, widest, widest + 1)] == [
        "outer", "outer", "fused", "fused", "blocks"]
    budget = quadratic.OUTER_MAX_BYTES                      # products past it take 'fused' (they are saved)
    assert [quadratic._cuda_strategy(32, gpu, b) for b in (budget, budget + 1)] == ["outer", "fused"]
    monkeypatch.setitem(quadratic._FUSED_WORKS, str(gpu), False)
    assert [quadratic._cuda_strategy(c, gpu) for c in (16, 96)] == ["outer", "blocks"]
    try:
        for name in ("blocks", "fused", "gather", "outer"):
            quadratic.set_cuda_strategy(name)
            assert quadratic._cuda_strategy(16, gpu) == quadratic._cuda_strategy(512, gpu) == name
    finally:
        quadratic.set_cuda_strategy("auto")


def test_auto_strategy_falls_back_to_blocks_with_one_warning_where_triton_cannot_run(monkeypatch):
    """Triton's kernels cannot launch on this machine's CPU tensors (outside the interpreter), as on
    a GPU machine without the C compiler Triton needs: one warning, then 'blocks'."""
    from bionets.layers import quadratic
    monkeypatch.setattr(quadratic, "_FUSED_WORKS", {})
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="Triton kernels cannot run on cpu.*'blocks'"):
        assert not quadratic._fused_works(torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)                  # the try drew no random numbers
    assert quadratic._cuda_strategy(96, torch.device("cpu")) == "blocks"    # remembered: no second try
