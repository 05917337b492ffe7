"""The CUDA paths written as Triton kernels (RAA; the quadratic layer's 'fused' strategy, CUDA's default),
checked on the CPU by Triton's interpreter in a subprocess (the interpreter is chosen when the
kernels are defined, so it needs its own process)."""
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
    assert "checked 16 RAA cases" in done.stdout and "checked 4 quadratic cases" in done.stdout
    assert "checked the compiled quadratic operator" in done.stdout


def test_cpu_tensors_take_the_pytorch_path():
    from bionets.layers.raa import _triton_layout
    assert _triton_layout(torch.randn(2, 4, 3, 3), 1) is None


def test_cuda_strategy_switch_names_the_choices_and_auto_picks_fused_up_to_its_width():
    from bionets.errors import BionetsError
    from bionets.layers import quadratic
    with pytest.raises(BionetsError, match="auto.*blocks.*fused"):
        quadratic.set_cuda_strategy("tiles")
    assert quadratic._CUDA_STRATEGY == "auto"
    widest = quadratic.FUSED_MAX_CHANNELS
    assert [quadratic._cuda_strategy(c) for c in (16, widest, widest + 1)] == ["fused", "fused", "blocks"]
    try:
        for name in ("blocks", "fused"):
            quadratic.set_cuda_strategy(name)
            assert quadratic._cuda_strategy(16) == quadratic._cuda_strategy(512) == name
    finally:
        quadratic.set_cuda_strategy("auto")
