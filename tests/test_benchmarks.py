"""Smoke runs of the engine, DNRT and Dit benchmarks on tiny sizes: they run and print every ratio."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_engine_smoke():
    text = load("bench_engine").main(["--device", "cpu", "--images", "64", "--batch", "16", "--repeats", "1",
                                      "--epochs", "1"])
    assert "channels_last=True" in text and "steps per epoch" in text
    assert "ratio" in text and "target <= 1.10x" in text


def test_bench_dnrt_smoke():
    text = load("bench_dnrt").main(["--device", "cpu", "--batch", "2", "--repeats", "1", "--rounds", "1",
                                    "--skip-compiled", "--alternate", "2"])
    assert text.count("stepped in turn in one process, 2 steps each") == 3 and "- resnet20_cifar RAA: " in text
    for needle in ("vit_tiny (img 32, patch 4) GELU", "vit_tiny (img 32, patch 4) RAA", "resnet20_cifar RAA",
                   "resnet20_cifar ReLU + ARR"):
        assert f"| {needle} |" in text


def test_bench_dnrt_runs_the_chosen_cases_only():
    text = load("bench_dnrt").main(["--device", "cpu", "--batch", "2", "--repeats", "1", "--rounds", "2",
                                    "--skip-compiled", "--alternate", "0", "--cases", "resnet-relu"])
    assert "| resnet20_cifar ReLU |" in text and "vit_tiny" not in text and "GELU" not in text
    assert "nan" not in text                    # the second round's peak memory is the first's, not measured again
    with pytest.raises(SystemExit):
        load("bench_dnrt").main(["--cases", "vit,resnet"])


def test_a_cases_later_rounds_keep_the_peak_memory_the_first_measured():
    import math

    import torch
    from bionets.bench import Timing, fastest, measure
    layer, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
    assert math.isnan(measure("later round", layer, x, repeats=1, peak=False).peak_mb)
    first, slower, faster = Timing("a", 1, 2.0, 1, 5.0), Timing("a", 1, 3.0, 1, math.nan), Timing("a", 1, 1.0, 1, math.nan)
    assert fastest(None, first) is first
    assert fastest(first, slower) == first
    assert fastest(first, faster) == Timing("a", 1, 1.0, 1, 5.0)


def test_models_are_compiled_in_their_memory_format_when_asked():
    import torch
    from bionets.bench import compiled
    conv = torch.nn.Conv2d(3, 4, 3)
    assert compiled(conv, None, True) is conv
    model = compiled(conv, "reduce-overhead", True)
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_bench_dit_smoke(tmp_path):
    """Every part of the Dit benchmark at tiny sizes, one round each: (a) with its stepped-in-turn
    line, (b), (c) with ConvNeXt at 32 x 32, (d)'s multiply-adds, and the report also written to --out."""
    out = tmp_path / "dit.md"
    text = load("bench_dit").main(["--device", "cpu", "--batch", "2", "--img", "8", "--convnext-batch", "1",
                                   "--convnext-img", "32", "--warmup", "0", "--repeats", "1", "--rounds", "1",
                                   "--alternate", "2", "--macs-models", "dit_resnet20", "--no-isolate",
                                   "--out", str(out)])
    assert out.read_text() == text
    for needle in ("(a) Dit-ResNet-20", "(b) quadratic layer", "(c) Dit-ConvNeXt-T", "impl=sym",
                   "| dit_resnet20 step, batch 2 x 3 x 8 x 8 |", "| dit_convnext_tiny step, batch 1 x 3 x 32 x 32 |"):
        assert needle in text
    assert text.count("\nstep ratio ") == 4
    assert "stepped in turn in one process, 2 steps each" in text and "round by round: median" in text
    # measured multiply-adds: plain ResNet-20 40.8 M; the term adds C_out*C(C+1)/2 = 32*528 MACs per
    # pixel of a 16x16 map in the sym form (4.3 M) and 32*32^2 (8.4 M) with all products formed
    assert "| dit_resnet20 | 32x32 | 45.1 M | 49.2 M | resnet20_cifar | 40.8 M |" in text


def test_bench_stds_smoke():
    text = load("bench_stds").main(["--device", "cpu", "--inputs", "2x32", "--T", "1", "--rows", "2", "--levels", "0.95",
                                    "--model-batch", "1", "--repeats", "1", "--rounds", "1", "--no-isolate"])
    assert "stmod step ratio" in text and "| 95.0% |" in text
    assert "snn_cifar10 exported at 95.0% sparsity" in text and "same outputs: True" in text


def test_host_time_probe_smoke():
    text = load("host_time").main(["--device", "cpu", "--batch", "2", "--calls", "1"])
    for needle in ("16 channels, 32x32, RAA relu:", "64 channels, 8x8, QuadraticChannel:", "ms host"):
        assert needle in text
    assert text.count(" MB") == 12                        # each module's call peak memory, at two widths
    assert "QuadraticChannel, 16 channels, 32x32: 5 calls" in text and "Self CPU" in text
    assert "RAA's parts" in text and "ReLU as a Python autograd function, forward + backward:" in text


def test_step_profile_smoke():
    text = load("step_profile").main(["--device", "cpu", "--batch", "2", "--steps", "1", "--top", "2",
                                      "--cases", "resnet-relu,dit"])
    for needle in ("resnet-relu: ", "resnet-relu RAA: ", "resnet-relu + ARR: ", "dit_resnet20: ", "host us a step"):
        assert needle in text
    assert text.count(" calls  ") == 6                   # the two largest differences for each of the three twins
    assert text.count(" MB") == 5                         # each model's step peak memory


def test_raa_param_cost_smoke():
    text = load("raa_param_cost").main(["--device", "cpu", "--batch", "2", "--steps", "2", "--rounds", "1"])
    for act in ("gelu", "relu"):
        for way in ("", " RAA", " RAA, vc frozen", " RAA, vc not in the optimizer"):
            assert f"- round 1, {act}{way}: " in text
    assert text.count("x (") == 8 and text.count(" MB") == 8


def test_arr_cost_smoke():
    text = load("arr_cost").main(["--device", "cpu", "--batch", "2", "--steps", "2", "--rounds", "1",
                                  "--cases", "resnet-relu"])
    ways = ["", " hook", " loss, no backward", " ARR"]
    from bionets.layers import cpu_kernels
    if cpu_kernels.ops("arr_cpu") is not None:
        ways.append(" ARR, operator called directly")
    for way in ways:
        assert f"- round 1, resnet-relu{way}: " in text
    assert text.count("x (") == len(ways) and text.count(" MB") == len(ways)


def test_cpu_peak_memory_is_each_steps_own():
    """The profiler's timeline counts what a step allocates, its first tensor included, whatever ran
    before it in the process (the resident set's rise read 0 for a step after a larger one)."""
    import torch

    from bionets.bench import cpu_step_peak_mb
    big = cpu_step_peak_mb(lambda: torch.ones(2**22))                  # 16 MB, the step's first and only tensor
    small = cpu_step_peak_mb(lambda: torch.ones(2**20) + 1)            # 4 MB twice, alive together
    assert big == pytest.approx(16, rel=0.01) and small == pytest.approx(8, rel=0.01)


@pytest.mark.parametrize("name, args", [("bench_dit", ["--rounds", "0"]), ("bench_dit", ["--batch", "0"]),
                                        ("bench_dnrt", ["--rounds", "0"]), ("bench_engine", ["--epochs", "0"]),
                                        ("bench_stds", ["--repeats", "0"]), ("host_time", ["--calls", "0"]),
                                        ("step_profile", ["--steps", "0"]), ("bench_dit", ["--out", "/nonexistent/x.md"]),
                                        ("raa_param_cost", ["--steps", "0"]), ("arr_cost", ["--rounds", "0"])])
def test_a_count_of_zero_or_a_report_without_a_folder_is_refused_before_measuring(name, args, capsys):
    """(They failed after measuring: a median of nothing, a division by 0 steps, a report lost at the end.)"""
    with pytest.raises(SystemExit) as exited:
        load(name).main(args)
    assert exited.value.code == 2 and f"error: argument {args[0]}: " in capsys.readouterr().err


@pytest.mark.parametrize("name, args, said", [
    ("bench_stds", ["--inputs", "4by64"], "--inputs 4by64: give BATCHxSIDE pairs of whole numbers >= 1"),
    ("bench_stds", ["--levels", "0.9,1.5"], "--levels 0.9,1.5: give sparsity fractions in [0, 1)"),
    ("step_profile", ["--cases", "bogus"], "--cases bogus: the cases are resnet-gelu, resnet-relu, vit, dit"),
    ("arr_cost", ["--cases", "vit,bogus"], "--cases vit,bogus: the cases are resnet-relu, vit"),
    ("bench_engine", ["--device", "gpu"], "--device gpu is not a device bionets runs on")])
def test_a_scripts_bad_option_is_one_line(name, args, said, capsys, monkeypatch):
    from bionets.bench import run_script
    module = load(name)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *args])
    with pytest.raises(SystemExit) as exited:
        run_script(lambda: module.main(args))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"{name}.py: error: {said}") and err.count("\n") == 1, err
