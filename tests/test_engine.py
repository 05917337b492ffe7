"""The training engine: exact resume, atomic checkpoints, hooks, accumulation, metrics."""
import functools
import json
import operator
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml

from bionets.configbase import Section
from bionets.engine.checkpoint import load_checkpoint, save_checkpoint
from bionets.engine.signals import ctrl_c_deferred
from bionets.engine.hooks import Hook
from bionets.engine.optim import OptimConfig, lr_mult_summary, param_groups
from bionets.engine.trainer import train
from bionets.errors import BionetsError
from bionets.mechanisms import Applied, Report, register_mechanism
from compile_helpers import needs_cpu_compiler
from engine_helpers import fast_config


def weights(path):
    return load_checkpoint(path)["model"]


def test_training_learns_and_writes_run_directory(tmp_path):
    seen = []
    summary = train(fast_config(tmp_path, "train.epochs=3"), quiet=True,
                    on_epoch=lambda record: seen.append((record, (tmp_path / "run" / "last.pt").is_file())))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [(r["epoch"], saved) for r, saved in seen] == [(1, True), (2, True), (3, True)]    # after its checkpoint
    for key in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "images_per_s", "epoch_time"):
        assert key in records[0]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert summary["final_top1"] > 85 and summary["best_top1"] >= summary["final_top1"]
    assert summary["peak_top1"] == max(r["test_top1"] for r in records) == summary["best_top1"]
    assert {"config.yaml", "last.pt", "best.pt", "summary.json", "tb"} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert any((run / "tb").iterdir())


class InterruptConfig(Section):
    at_step: int = 0


class Interrupt(Hook):
    """Raises KeyboardInterrupt (as Ctrl-C would) when training reaches a given optimizer step, while
    ``armed`` (a resumed run must keep its config, so the resume disarms it instead)."""

    armed = True

    def __init__(self, at_step):
        self.at_step = at_step

    def on_step(self, progress):
        if self.at_step and progress.step == self.at_step and Interrupt.armed:
            raise KeyboardInterrupt


@register_mechanism("test_interrupt", InterruptConfig, order=98)
def _apply_interrupt(model, cfg):
    return Applied(model, [Interrupt(cfg.at_step)], Report("test_interrupt"))


def test_resume_is_exact(tmp_path):
    """2 epochs straight == 1 epoch, interrupted, then resumed (augmentation, EMA and cosine included)."""
    steps_per_epoch = 1437 // 64
    extra = ["train.epochs=2", "train.ema_decay=0.9", "data.augment=true",
             f"mechanisms={{test_interrupt: {{at_step: {steps_per_epoch + 3}}}}}"]
    Interrupt.armed = False
    train(fast_config(tmp_path, *extra, name="straight"), quiet=True)
    Interrupt.armed = True
    with pytest.raises(KeyboardInterrupt):
        train(fast_config(tmp_path, *extra, name="split"), quiet=True)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    Interrupt.armed = False
    train(fast_config(tmp_path, *extra, f"resume={tmp_path / 'split' / 'last.pt'}", name="split"), quiet=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["history"][-1]["test_top1"] == b["history"][-1]["test_top1"]


def test_gradient_accumulation_matches_large_batch(tmp_path):
    common = ["train.epochs=1", "data.augment=false"]
    train(fast_config(tmp_path, *common, "data.batch_size=64", name="big"), quiet=True)
    train(fast_config(tmp_path, *common, "data.batch_size=32", "train.grad_accum=2", name="accum"), quiet=True)
    a, b = weights(tmp_path / "big" / "last.pt"), weights(tmp_path / "accum" / "last.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


class CountingConfig(Section):
    weight: float = 0.0


class CountingHook(Hook):
    def __init__(self, weight):
        self.weight, self.steps, self.aux_calls, self.ended = weight, [], 0, False

    def aux_loss(self, model, images, logits, targets):
        self.aux_calls += 1
        return self.weight * logits.pow(2).mean()

    def on_step(self, progress):
        self.steps.append((progress.step, progress.total_steps))

    def epoch_metrics(self, model):
        return {"hook_steps": float(len(self.steps)), "hook_steps/per_layer": 1.0}

    def on_train_end(self, run_dir, history):
        self.ended = len(history)


HOOKS = []


@register_mechanism("test_counting", CountingConfig, order=99)
def _apply_counting(model, cfg):
    hook = CountingHook(cfg.weight)
    HOOKS.append(hook)
    return Applied(model, [hook], Report("test_counting", ["counted"], 0))


def test_hooks_are_called_in_order(tmp_path):
    HOOKS.clear()
    summary = train(fast_config(tmp_path, "train.epochs=2", "mechanisms={test_counting: {weight: 0.5}}"), quiet=True)
    hook = HOOKS[0]
    steps_per_epoch = 1437 // 64
    assert hook.steps[0] == (0, 2 * steps_per_epoch)              # called once before the first step
    assert [s for s, _ in hook.steps] == list(range(2 * steps_per_epoch + 1))
    assert hook.aux_calls == 2 * steps_per_epoch and hook.ended == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["hook_steps"] == steps_per_epoch + 1
    # the summary takes the last epoch's mechanism metrics, not the per-layer ones nor the engine's own
    assert summary["hook_steps"] == 2 * steps_per_epoch + 1 and "hook_steps/per_layer" not in summary
    assert "train_loss" not in summary and "test_top1" not in summary


class LogitDtypes(Hook):
    """Records the dtype of the logits the training forward pass produced."""

    def __init__(self):
        self.seen = set()

    def aux_loss(self, model, images, logits, targets):
        self.seen.add(logits.dtype)


DTYPES = LogitDtypes()


@register_mechanism("test_logit_dtypes", Section, order=97)
def _apply_logit_dtypes(model, cfg):
    return Applied(model, [DTYPES], Report("test_logit_dtypes"))


def test_bf16_autocast_trains_on_the_cpu_and_fp16_is_refused(tmp_path):
    """train.amp=bf16 runs the CPU forward under bf16 autocast (the logits come out in bf16) and still
    learns; fp16, which needs CUDA, is one clear error."""
    DTYPES.seen.clear()
    summary = train(fast_config(tmp_path, "train.epochs=3", "train.amp=bf16", "mechanisms={test_logit_dtypes: {}}"),
                    quiet=True)
    assert DTYPES.seen == {torch.bfloat16}
    assert summary["final_top1"] > 80
    assert weights(tmp_path / "run" / "last.pt")["fc1.weight"].dtype == torch.float32   # weights stay float32
    with pytest.raises(BionetsError, match="train.amp=fp16 needs CUDA.*train.amp=bf16"):
        train(fast_config(tmp_path, "train.amp=fp16", name="fp16"), quiet=True)


def test_bf16_on_a_cpu_without_native_bf16_gets_a_note(tmp_path, capsys, monkeypatch):
    """On a CPU whose oneDNN has no native bf16 the run says that float32 is faster; with native
    bf16, with amp off, or on CUDA it says nothing."""
    from bionets.engine.trainer import slow_bf16_note
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert (slow_bf16_note("bf16", cpu) is None) == native
    assert slow_bf16_note("off", cpu) is None and slow_bf16_note("bf16", cuda) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    train(fast_config(tmp_path, "train.epochs=1", "train.amp=bf16"))
    assert "note: train.amp=bf16 on a CPU without native bf16" in capsys.readouterr().out


def test_a_diverged_run_stops_with_one_line_before_writing_its_checkpoint(tmp_path):
    """Failed before its first checkpoint, the run removes the directory it claimed (it held only its
    config and empty logs), so that the rerun after the fix takes the same name, not run-2."""
    with pytest.raises(BionetsError, match=r"training diverged: the training loss of epoch 1 is nan .*lower optim.lr"):
        train(fast_config(tmp_path, "train.epochs=3", "optim.lr=1e12"), quiet=True)
    assert not (tmp_path / "run").exists()
    assert train(fast_config(tmp_path, "train.epochs=1"), quiet=True)["run_dir"] == str(tmp_path / "run")


def test_compile_without_a_cpu_compiler_is_one_line(tmp_path, monkeypatch):
    """Where Inductor finds no C++ compiler, train.compile on the CPU (and RAA's compiled=True) stop
    with one line before any work, not deep inside the first compiled call."""
    from bionets import toolchain
    from bionets.layers.raa import RAA
    monkeypatch.setattr(toolchain, "cpu_compiler_problem", lambda: "InvalidCxxCompiler: none found")
    with pytest.raises(BionetsError, match="train.compile on the CPU needs a C.. compiler .*set train.compile=false"):
        train(fast_config(tmp_path, "train.compile=true"), quiet=True)
    with pytest.raises(BionetsError, match=r"RAA\(compiled=True\) on the CPU needs a C.. compiler"):
        RAA(4, compiled=True)(torch.randn(2, 4))


def test_lr_multipliers_select_parameters_by_pattern():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = param_groups(model, OptimConfig(lr=0.1, lr_mult={"1.*": 10.0}))
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_lr == {(0.1, 5e-4): 1, (0.1, 0.0): 1, (1.0, 5e-4): 1, (1.0, 0.0): 1}
    # the start-of-run line counts each pattern's tensors (the first matching pattern wins)
    line = lr_mult_summary(model, OptimConfig(lr_mult={"1.*": 10.0, "*.weight": 2.0, "*.v": 0.01}))
    assert line == "optim.lr_mult: '1.*' x10 on 2 tensor(s); '*.weight' x2 on 1 tensor(s); '*.v' matches no parameter"
    assert lr_mult_summary(model, OptimConfig()) == ""
    # a pattern whose every match an earlier one took says which (a catch-all before RAA's '*.v')
    line = lr_mult_summary(model, OptimConfig(lr_mult={"*": 2.0, "1.*": 0.5, "*.bias": 0.1}))
    assert line == ("optim.lr_mult: '*' x2 on 4 tensor(s); '1.*' takes no parameter (the earlier '*' took its "
                    "matches: first match wins); '*.bias' takes no parameter (the earlier '*' took its matches: "
                    "first match wins)")


def test_no_weight_decay_on_what_a_timm_model_lists():
    """timm's no_weight_decay() (a ViT's pos_embed and cls_token) joins the 1-D parameters without decay,
    as in timm's and DeiT's recipes; decay_norm_and_bias decays every parameter."""
    import timm
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    free = {id(p) for g in param_groups(model, OptimConfig(weight_decay=0.05)) if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in free}
    assert {"pos_embed", "cls_token"} <= names and "patch_embed.proj.weight" not in names
    assert names == {n for n, p in model.named_parameters() if p.ndim <= 1} | {"pos_embed", "cls_token"}
    groups = param_groups(model, OptimConfig(weight_decay=0.05, decay_norm_and_bias=True))
    assert all(g["weight_decay"] == 0.05 for g in groups)


@pytest.mark.parametrize("sched", ["cosine", "multistep", "step"])
def test_lr_multipliers_hold_through_the_warm_up(sched):
    """A group at 10x (or 0.01x) the base rate keeps that ratio at every step, warm-up included, as the
    paper's code trains Dit's quadratic parameters at 0.1 against 0.01 in its warm-up epoch (timm's
    schedulers warmed every group up from the same warmup_lr: 1x at the first step)."""
    from bionets.engine.optim import SchedConfig, create_optimizer, create_scheduler
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = create_optimizer(model, OptimConfig(lr=0.1, lr_mult={"1.*": 10.0, "0.bias": 0.01}))
    sched = create_scheduler(opt, SchedConfig(name=sched, warmup_epochs=2, warmup_lr=0.01, milestones=[3], decay_epochs=3),
                             epochs=5, steps_per_epoch=4)
    seen = []
    for step in range(20):
        lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
        assert lrs[10.0] == pytest.approx(10 * lrs[1.0]) and lrs[0.01] == pytest.approx(0.01 * lrs[1.0])
        seen.append(lrs[1.0])
        sched.step_update(step + 1)
    assert seen[0] == pytest.approx(0.01) and max(seen) > 0.08 and seen[-1] < max(seen)


def test_a_run_shorter_than_its_milestones_says_the_rate_never_drops(tmp_path, capsys):
    """cifar10/resnet20 run for 2 epochs keeps its milestones [80, 120]: the start-up lines say so."""
    from bionets.engine.optim import SchedConfig, schedule_note
    assert schedule_note(SchedConfig(name="multistep", milestones=[1, 80, 120]), 80).startswith(
        "note: sched.milestones [80, 120] lie at or past train.epochs=80")
    assert schedule_note(SchedConfig(name="multistep", milestones=[1]), 2) is None
    assert schedule_note(SchedConfig(name="cosine"), 2) is None
    train(fast_config(tmp_path, "train.epochs=1", "sched.name=multistep"))
    assert "note: sched.milestones [80, 120] lie at or past train.epochs=1" in capsys.readouterr().out


def test_options_the_optimizer_does_not_take_are_noted():
    """optim.momentum under AdamW, betas under SGD: set away from their defaults, they change
    nothing, and the start-up lines say so; no bundled config sets one (checked on all of them)."""
    import glob

    from bionets.config import load_config
    from bionets.engine.optim import OptimConfig, unused_options_note
    assert unused_options_note(OptimConfig(name="adamw", momentum=0.5)) == (
        "note: optim.name=adamw does not take optim.momentum=0.5 (ignored)")
    assert "optim.betas=(0.8, 0.99)" in unused_options_note(OptimConfig(name="sgd", betas=(0.8, 0.99)))
    assert unused_options_note(OptimConfig(name="adamw")) is None
    assert unused_options_note(OptimConfig(name="sgd", nesterov=True, momentum=0.5)) is None
    bundled = glob.glob(str(Path(__file__).parent.parent / "configs" / "**" / "*.yaml"), recursive=True)
    assert len(bundled) > 100 and not [p for p in bundled if unused_options_note(load_config(p).optim)]


def test_compiling_on_the_cpu_prints_no_cuda_runtime_warning():
    """Inductor imports torch.utils.cpp_extension, which warns 'No CUDA runtime is found' on a
    CPU-only machine: it showed under --quiet with train.compile (checked in a fresh process)."""
    import subprocess
    import sys
    code = ("from bionets.toolchain import require_cpu_compiler\n"
            "require_cpu_compiler('train.compile', 'set train.compile=false')\n"
            "import torch.utils.cpp_extension\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "No CUDA runtime" not in done.stderr, done.stderr


def test_image_folder_options_on_another_dataset_are_noted(tmp_path, capsys):
    """RandAugment, random erasing or an image size set for CIFAR or the digits changed nothing,
    silently; no bundled config sets one away from the image folders (checked on all of them)."""
    import glob

    from bionets.config import load_config
    from bionets.data.config import DataConfig, unused_data_options_note
    assert unused_data_options_note(DataConfig(name="cifar10", auto_augment="rand-m9-mstd0.5", reprob=0.5)) == (
        "note: data.name=cifar10 does not take data.auto_augment=rand-m9-mstd0.5, data.reprob=0.5 (imagefolder's "
        "options; ignored)")
    assert unused_data_options_note(DataConfig(name="imagefolder", auto_augment="rand-m9-mstd0.5")) is None
    # a root or a download for a dataset that reads no files: a run meant for CIFAR that forgot data.name
    assert unused_data_options_note(DataConfig(name="digits", root="/data", download=True, reprob=0.5)) == (
        "note: data.name=digits does not take data.root=/data, data.download=true (it reads no files: set data.name "
        "to the dataset there); nor data.reprob=0.5 (imagefolder's options; ignored)")
    assert unused_data_options_note(DataConfig(name="cifar10", root="/data", download=True)) is None
    assert "does not take data.download=true (no image folder is downloaded" in unused_data_options_note(
        DataConfig(name="imagefolder", download=True))
    from bionets.data import DATASETS
    from bionets.data.config import IN_MEMORY
    assert set(DATASETS) == {*IN_MEMORY, "imagefolder"}     # a new dataset is placed on one side or the other
    bundled = glob.glob(str(Path(__file__).parent.parent / "configs" / "**" / "*.yaml"), recursive=True)
    assert len(bundled) > 100 and not [p for p in bundled if unused_data_options_note(load_config(p).data)]
    train(fast_config(tmp_path, "train.epochs=1", "data.img_size=64"))
    assert "note: data.name=digits does not take data.img_size=64" in capsys.readouterr().out


RUN = {"config": {}, "model": {}}       # the entries every checkpoint of a run holds


def test_checkpoint_is_atomic_and_bad_files_are_one_line(tmp_path):
    with pytest.raises(BionetsError, match="load_checkpoint takes the path of a .pt file .*, got NoneType"):
        load_checkpoint(None)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {**RUN, "x": torch.ones(3)})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {**RUN, "x": Boom()})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))          # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]              # no temp file left
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    for bad, msg in ((truncated, "corrupt or truncated"), (tmp_path / "none.pt", "does not exist")):
        with pytest.raises(BionetsError, match=msg):
            load_checkpoint(bad)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(BionetsError, match="not a bionets checkpoint .*: give a file that 'bionets train'"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoints_of_other_programs_and_damaged_ones_are_one_line(tmp_path, monkeypatch):
    """A whole model pickled by another script (its class not importable here), a file with the
    marker but without a run's entries, or with a damaged optimizer state: one error line each."""
    import sys
    import types
    other = types.ModuleType("someone_elses_script")
    other.Net = type("Net", (), {"__module__": "someone_elses_script"})
    monkeypatch.setitem(sys.modules, "someone_elses_script", other)
    torch.save(other.Net(), tmp_path / "whole_model.pt")
    monkeypatch.delitem(sys.modules, "someone_elses_script")
    with pytest.raises(BionetsError, match="not a bionets checkpoint \\(it pickles objects of another program"):
        load_checkpoint(tmp_path / "whole_model.pt")
    for state, msg in (({"model": {}}, "lacks its 'config' entry"),
                       ({"config": {}, "model": 3}, "holds a int as its 'model' entry"),
                       ({"config": {}, "model": {0: torch.zeros(1)}}, "holds the key 0 in its 'model' state dict, whose "
                                                                      "keys are parameter names"),
                       ({"config": {}, "model": {"w": [1.0]}}, "holds a list at 'w' in its 'model' state dict, whose "
                                                               "values are tensors")):
        save_checkpoint(tmp_path / "bad.pt", state)
        with pytest.raises(BionetsError, match=msg):
            load_checkpoint(tmp_path / "bad.pt")
    train(fast_config(tmp_path, "train.epochs=1", name="a"), quiet=True)
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    for key, value, msg in (("optimizer", None, "lacks its 'optimizer' entry"),
                            ("optimizer", {"state": {}}, "its optimizer, schedule, EMA or random state cannot be "
                                                         "restored \\(KeyError"),
                            ("history", [1, 2], "holds a list of non-records as its 'history' entry"),
                            # (failed at the summary, after the resumed run had trained)
                            ("history", [{"epoch": 1, "train_loss": "x"}], "holds train_loss='x' in its 'history' entry, whose epoch records"),
                            # (failed at the first optimizer step, or in NumPy)
                            ("optimizer", {**ckpt["optimizer"], "state": {i: {k: v[..., :1] if v.dim() else v
                                                                              for k, v in st.items()}
                                                                          for i, st in ckpt["optimizer"]["state"].items()}},
                             "cannot be restored \\(ValueError: state '.*' has shape"),
                            ("rng", {**ckpt["rng"], "numpy": ("MT19937", [1, 2])}, "cannot be restored \\(IndexError"),
                            ("best_top1", float("nan"), "holds best_top1=nan \\(not as 'bionets train' writes it\\)"),
                            ("epoch", -1, "is at epoch -1, step 22, outside its run's 0..1 epochs"),
                            ("epoch", 999, "is at epoch 999, step 22, outside its run's 0..1 epochs")):
        # (at epoch 0: a finished run's checkpoint resumed elsewhere is refused before it is restored)
        save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in {**ckpt, "epoch": 0, key: value}.items() if v is not None})
        with pytest.raises(BionetsError, match=msg):
            train(fast_config(tmp_path, "train.epochs=1", f"resume={tmp_path / 'bad.pt'}", name="b"), quiet=True)
    # bytes changed inside a tensor: torch.load read them as they were, the zip's CRC-32 tells
    data = bytearray((tmp_path / "a" / "last.pt").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(255 - b for b in data[middle:middle + 200])
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(BionetsError, match="is corrupt or truncated \\(BadZipFile\\)"):
        load_checkpoint(tmp_path / "flipped.pt")


class _CtrlCWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C arrives in the middle of torch.save
        time.sleep(0.05)                        # (a Python handler would run here)
        return (int, (2,))


@pytest.fixture
def sigint_handler():
    """Sets SIGINT's handler for a test (Python's default: a process started in the background has
    Ctrl-C ignored from the start), restoring the one before."""
    before = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def cli_sigterm():
    """SIGTERM handled as a ``bionets`` command handles it (Terminated) for a test: bionets.cli,
    whose handler before is restored after."""
    import bionets.cli as cli
    cli._terminated_at = None
    before = signal.signal(signal.SIGTERM, cli._raise_terminated)
    yield cli
    signal.signal(signal.SIGTERM, before)


def test_ctrl_c_during_a_checkpoint_write_takes_effect_after_it(tmp_path, sigint_handler):
    """A KeyboardInterrupt raised inside torch.save made its zip writer fail while closing, and the run
    ended on that RuntimeError's traceback (exit 1, not 130). Now the write finishes, then Ctrl-C acts."""
    sigint_handler(signal.default_int_handler)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**RUN, "epoch": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**RUN, "epoch": _CtrlCWhilePickled()})
    assert load_checkpoint(path)["epoch"] == 2                               # the new checkpoint is complete
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # the handler is restored


class _SigtermWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)    # a scheduler's stop arrives in the middle of torch.save
        time.sleep(0.05)
        return (int, (3,))


def test_sigterm_during_a_checkpoint_write_takes_effect_after_it(tmp_path, cli_sigterm):
    """A SIGTERM (SLURM's, Kubernetes') in the middle of a write ended the process there and left a
    partial temporary file; it is held as Ctrl-C is, then acts as its handler does (the CLI's raises
    Terminated)."""
    from bionets.errors import Terminated
    cli = cli_sigterm
    with pytest.raises(KeyboardInterrupt) as stopped:   # (a plain KeyboardInterrupt would stop pytest itself)
        save_checkpoint(tmp_path / "last.pt", {**RUN, "epoch": _SigtermWhilePickled()})
    assert isinstance(stopped.value, Terminated)
    assert signal.getsignal(signal.SIGTERM) is cli._raise_terminated
    os.kill(os.getpid(), signal.SIGTERM)        # a second one while the run winds down: left to finish
    time.sleep(0.05)
    cli._terminated_at -= cli.STOPPING_S        # much later, the process still running: it stops again
    with pytest.raises(KeyboardInterrupt) as again:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert isinstance(again.value, Terminated)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _CtrlCThenSigtermWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return (int, (4,))


def test_ctrl_c_and_sigterm_both_held_sigterm_acts(tmp_path, sigint_handler, cli_sigterm):
    """Both held during a write: the scheduler's stop acts (exit 143, not 130), after the write."""
    from bionets.errors import Terminated
    sigint_handler(signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as stopped:
        save_checkpoint(tmp_path / "last.pt", {**RUN, "epoch": _CtrlCThenSigtermWhilePickled()})
    assert isinstance(stopped.value, Terminated)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4


def _signal_then_set(real_signal, number):
    """``real_signal(signum, handler)`` with signal ``number`` sent just before, with no Python code
    between the two calls (map runs both inside C), so that Python's check for pending signals first
    runs inside signal.signal, before it changes the handler, as a signal arriving then would."""
    def call(signum, handler):
        return list(map(operator.call, [functools.partial(os.kill, os.getpid(), number),
                                        functools.partial(real_signal, signum, handler)]))[1]
    return call


def test_a_signal_while_the_handlers_are_put_back_leaves_none_half_restored(sigint_handler, monkeypatch):
    """A Ctrl-C while SIGTERM's handler is put back (SIGINT's already is) raised inside that
    signal.signal call before it changed anything, which kept the deferral's handler on SIGTERM
    (every later SIGTERM swallowed) and the deferral marked as running (every later write
    unprotected). Now SIGTERM's is set again and the Ctrl-C raised after."""
    from bionets.engine import signals
    sigint_handler(signal.default_int_handler)
    term_before = signal.getsignal(signal.SIGTERM)
    real_signal, pressed = signal.signal, []
    ctrl_c_then_set = _signal_then_set(real_signal, signal.SIGINT)

    def fake(signum, handler):
        if signum == signal.SIGTERM and handler is term_before and not pressed:    # putting SIGTERM's back
            pressed.append(signum)
            return ctrl_c_then_set(signum, handler)
        return real_signal(signum, handler)

    monkeypatch.setattr(signals.signal, "signal", fake)
    with pytest.raises(KeyboardInterrupt) as stopped:
        with ctrl_c_deferred():
            pass
    monkeypatch.undo()
    assert pressed and type(stopped.value) is KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is term_before and not signals._deferring
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_while_the_handlers_are_put_in_place_leaves_none_changed(sigint_handler, cli_sigterm,
                                                                           monkeypatch):
    """A SIGTERM that arrives as the deferral installs its own SIGTERM handler (SIGINT's installed)
    raises from there: it left the deferral's handler on SIGINT and the deferral marked running."""
    from bionets.engine import signals
    from bionets.errors import Terminated
    cli = cli_sigterm
    sigint_handler(signal.default_int_handler)
    real_signal = signal.signal
    term_then_set = _signal_then_set(real_signal, signal.SIGTERM)
    monkeypatch.setattr(signals.signal, "signal", lambda signum, handler: (
        term_then_set if signum == signal.SIGTERM and handler is not cli._raise_terminated else real_signal)(
        signum, handler))
    with pytest.raises(KeyboardInterrupt) as stopped:
        with ctrl_c_deferred():
            pytest.fail("the block ran")
    monkeypatch.undo()
    assert isinstance(stopped.value, Terminated)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not signals._deferring
    assert signal.getsignal(signal.SIGTERM) is cli._raise_terminated


def test_a_stop_held_while_the_block_raises_still_acts(cli_sigterm):
    """The block's own error (a full disk, say) dropped a SIGTERM held during it: a run whose caller
    catches the error went on. The stop acts, the error as its context."""
    from bionets.errors import Terminated
    with pytest.raises(KeyboardInterrupt) as stopped:
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            raise OSError(28, "No space left on device")
    assert isinstance(stopped.value, Terminated) and isinstance(stopped.value.__context__, OSError)


@pytest.mark.parametrize("raised", [OSError(28, "No space left on device"), "torch"])
def test_a_full_disk_during_a_write_is_one_line_and_keeps_the_earlier_file(tmp_path, raised):
    """torch.save reports a full disk as a RuntimeError raised while handling the OSError (35 lines
    of traceback); the earlier file stays, and no temporary file is left."""
    from bionets.engine.files import write_atomic
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**RUN, "epoch": 1})

    def failing(f):
        f.write(b"partial")
        if raised != "torch":
            raise raised
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 843136 vs 843032")

    with pytest.raises(BionetsError, match=r"cannot write '.*last.pt' \(No space left on device\): free space there "
                                           r"or write elsewhere .*; the earlier last.pt there is unchanged"):
        write_atomic(path, failing)
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(ValueError):                 # not a write failure: as it is
        write_atomic(path, lambda f: int("x"))


def test_a_write_refused_for_another_reason_does_not_advise_freeing_space(tmp_path):
    """Only a full disk or quota gets "free space"; an OSError its raiser set aside (``from None``)
    is not the write's failure."""
    from bionets.engine.files import write_atomic
    path = tmp_path / "last.pt"

    def refused(f):
        raise OSError(5, "Input/output error")

    with pytest.raises(BionetsError, match=r"\(Input/output error\): write elsewhere \(another out_dir or path\)$"):
        write_atomic(path, refused)

    def suppressed(f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise ValueError("not a write failure") from None

    with pytest.raises(ValueError):
        write_atomic(path, suppressed)
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_ignores_ctrl_c_goes_on_ignoring_it_during_a_write(tmp_path, sigint_handler):
    """Started in the background or under nohup, a run has Ctrl-C ignored: the deferral must not turn
    a Ctrl-C during a checkpoint write into a KeyboardInterrupt (it found the suite's own test failing
    when the suite was started in the background)."""
    sigint_handler(signal.SIG_IGN)
    save_checkpoint(tmp_path / "last.pt", {**RUN, "epoch": _CtrlCWhilePickled()})
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_ctrl_c_held_by_an_outer_deferral_acts_when_the_outer_block_ends(sigint_handler):
    """The epoch's bookkeeping (metrics, last.pt, best.pt) is one deferred block around the checkpoint
    writes' own: a Ctrl-C during last.pt must not stop the run before best.pt is written."""
    sigint_handler(signal.default_int_handler)
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            with ctrl_c_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                steps.append("inner")
            steps.append("outer")
    assert steps == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_tensorboards_replay_of_a_resumed_history_keeps_the_history(tmp_path, monkeypatch,
                                                                                 sigint_handler):
    """A resumed run whose TensorBoard log holds no events (here: deleted) first replays its history
    into it: a Ctrl-C there takes effect after the replay, and the writer is closed, so no event is
    lost. Resumed into a new directory, a run interrupted before its first checkpoint removes that
    directory instead."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bionets.engine.metrics import MetricsWriter
    sigint_handler(signal.default_int_handler)
    # stopped in its third epoch, at epoch 2 of 3 (a finished run resumed elsewhere is refused at once)
    extra = ["train.epochs=3", f"mechanisms={{test_interrupt: {{at_step: {2 * (1437 // 64) + 1}}}}}"]
    Interrupt.armed = True
    with pytest.raises(KeyboardInterrupt):
        train(fast_config(tmp_path, *extra, name="a"), quiet=True)
    shutil.rmtree(tmp_path / "a" / "tb")
    replay = MetricsWriter._scalars

    def interrupted_replay(self, record):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        replay(self, record)
    monkeypatch.setattr(MetricsWriter, "_scalars", interrupted_replay)
    for name in ("a", "b"):
        with pytest.raises(KeyboardInterrupt):
            train(fast_config(tmp_path, *extra, f"resume={tmp_path / 'a' / 'last.pt'}", name=name), quiet=True)
    events = EventAccumulator(str(tmp_path / "a" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
    assert not (tmp_path / "b").exists()


@needs_cpu_compiler
def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """train.compile takes torch.compile's modes: the mode reaches torch.compile, and 'reduce-overhead'
    (CUDA graphs on a GPU) trains on the CPU too."""
    modes = []
    compile_ = torch.compile

    def recording(model, *args, mode=None, **kwargs):
        modes.append(mode)
        return compile_(model, *args, mode=mode, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    summary = train(fast_config(tmp_path, "train.epochs=2", "train.compile=reduce-overhead"), quiet=True)
    assert modes == ["reduce-overhead"] and summary["final_top1"] > 50


@needs_cpu_compiler
def test_compiled_model_keeps_the_mechanisms_hooks(tmp_path):
    """train.compile with RAA and ARR: ARR's forward hook still captures the responses inside the
    compiled model and updates its class memory; the run ends where the eager run ends."""
    mechanisms = "mechanisms={raa: {}, arr: {weight: 1.0}}"
    compiled = train(fast_config(tmp_path, "train.epochs=2", "train.compile=true", mechanisms, name="c"), quiet=True)
    eager = train(fast_config(tmp_path, "train.epochs=2", mechanisms, name="e"), quiet=True)
    assert compiled["final_top1"] == pytest.approx(eager["final_top1"], abs=1.0)
    memory = {k: v for k, v in load_checkpoint(tmp_path / "c" / "last.pt")["model"].items() if k.startswith("arr_memory")}
    assert memory["arr_memory.seen"].all() and memory["arr_memory.mean"].abs().sum() > 0


@pytest.mark.parametrize("change, shown", [
    ("model.kwargs={in_chans: 1, img_size: 8, hidden: 32}", "model.kwargs.hidden: None -> 32"),
    ("train.epochs=2", "train.epochs: 1 -> 2"),
    ("optim.lr=0.01", "optim.lr: 0.2 -> 0.01"),
    ("optim.name=adamw", "optim.name: 'sgd' -> 'adamw'"),
])
def test_resume_refuses_a_config_that_changes_the_run(tmp_path, change, shown):
    """The saved optimizer and scheduler states would silently override a new lr, epochs or schedule
    (and a new optimizer failed on its state dict): one line naming the change instead."""
    train(fast_config(tmp_path, "train.epochs=1", name="a"), quiet=True)
    cfg = fast_config(tmp_path, "train.epochs=1", change, f"resume={tmp_path / 'a' / 'last.pt'}", name="b")
    # the fresh start it offers is the run's own config with model.init (model.init alone, on another
    # config, was refused for a checkpoint with mechanisms)
    fresh = f"'bionets train {tmp_path / 'a' / 'config.yaml'} model.init={tmp_path / 'a' / 'last.pt'}' and your changes"
    with pytest.raises(BionetsError, match=f"this config changes the run \\({re.escape(shown)}.*{re.escape(fresh)}"):
        train(cfg, quiet=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_checkpoint_saved_with_betas_and_eps_set_resumes_with_them_unset(tmp_path, capsys, optimizer):
    """Configs saved before optim.betas and optim.eps could be left unset (the optimizer's own) held
    (0.9, 0.999) and 1e-8 for every optimizer: resuming such a run with its config, which leaves them
    unset now, is no change of the run (the optimizer state holds what it used); resumed alone, an
    SGD run notes no ignored betas."""
    from bionets.config import resume_config
    train(fast_config(tmp_path, "train.epochs=2", f"optim.name={optimizer}", name="a"), quiet=True)
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    ckpt["epoch"], ckpt["step"], ckpt["history"] = 1, ckpt["step"] // 2, ckpt["history"][:1]     # stopped after epoch 1
    ckpt["config"]["optim"].update(betas=[0.9, 0.999], eps=1e-8)                                 # as saved before
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in ckpt.items() if k != "format"})
    train(fast_config(tmp_path, "train.epochs=2", f"optim.name={optimizer}", f"resume={tmp_path / 'old.pt'}",
                      name="b"), quiet=True)
    capsys.readouterr()
    resumed = resume_config(load_checkpoint(tmp_path / "old.pt"), [], str(tmp_path / "old.pt"))
    assert (resumed.optim.betas, resumed.optim.eps) == ((None, None) if optimizer == "sgd" else ((0.9, 0.999), 1e-8))


def test_resume_into_a_new_run_directory_gives_tensorboard_the_history(tmp_path):
    """metrics.jsonl and TensorBoard of a resumed run hold the same epochs, in a new directory too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(fast_config(tmp_path, "train.epochs=2", name="a"), quiet=True)
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    ckpt["epoch"], ckpt["step"], ckpt["history"] = 1, ckpt["step"] // 2, ckpt["history"][:1]     # as if stopped after epoch 1
    save_checkpoint(tmp_path / "epoch1.pt", {k: v for k, v in ckpt.items() if k != "format"})
    train(fast_config(tmp_path, "train.epochs=2", f"resume={tmp_path / 'epoch1.pt'}", name="b"), quiet=True)
    events = EventAccumulator(str(tmp_path / "b" / "tb")).Reload()
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("test_top1")] == logged == [1, 2]


def test_a_new_run_into_a_used_run_directory_takes_the_next_free_name(tmp_path, capsys):
    """A second run of the same name went into the first one's directory: its checkpoints replaced
    the earlier run's, and one that failed midway left a mix of both runs' files. Now it runs as
    NAME-2 (recorded in its config, so a resume continues there) and leaves the first run alone;
    the files are readable as any new file (umask), not owner-only like a temporary file."""
    import os
    train(fast_config(tmp_path, "train.epochs=1", name="a"), quiet=True)
    first = (tmp_path / "a" / "last.pt").read_bytes()
    summary = train(fast_config(tmp_path, "train.epochs=1", name="a"))
    said = capsys.readouterr().out
    assert f"run directory {tmp_path / 'a-2'} ({tmp_path / 'a'} holds an earlier run)" in said
    assert summary["run_dir"] == str(tmp_path / "a-2") and (tmp_path / "a" / "last.pt").read_bytes() == first
    assert load_checkpoint(tmp_path / "a-2" / "last.pt")["config"]["name"] == "a-2"
    umask = os.umask(0)
    os.umask(umask)
    assert {(tmp_path / "a-2" / f).stat().st_mode & 0o777 for f in ("last.pt", "config.yaml")} == {0o666 & ~umask}
    resumed = train(fast_config(tmp_path, "train.epochs=1", f"resume={tmp_path / 'a-2' / 'last.pt'}", name="a-2"),
                    quiet=True)
    assert resumed["run_dir"] == str(tmp_path / "a-2") and not (tmp_path / "a-3").exists()
    capsys.readouterr()
    # resumed into another run's directory: a free name too, said on stderr even under --quiet (from a
    # checkpoint with an epoch left: a finished run's is refused outside its own directory)
    ckpt = load_checkpoint(tmp_path / "a-2" / "last.pt")
    ckpt["epoch"], ckpt["step"], ckpt["history"] = 0, 0, []
    save_checkpoint(tmp_path / "epoch0.pt", {k: v for k, v in ckpt.items() if k != "format"})
    moved = train(fast_config(tmp_path, "train.epochs=1", f"resume={tmp_path / 'epoch0.pt'}", name="a"), quiet=True)
    assert moved["run_dir"] == str(tmp_path / "a-3") and (tmp_path / "a" / "last.pt").read_bytes() == first
    assert f"{tmp_path / 'a'} holds an earlier run; this run writes {tmp_path / 'a-3'}" in capsys.readouterr().err
    (tmp_path / "b").mkdir()                     # an empty directory holds no run: used as it is
    assert train(fast_config(tmp_path, "train.epochs=1", name="b"), quiet=True)["run_dir"] == str(tmp_path / "b")


def test_runs_started_at_the_same_moment_never_pick_the_same_directory(tmp_path):
    """Choosing a run's directory claims it (its config.yaml created only if absent, in one step):
    runs that choose before either has written anything still get different directories. The
    claim holds that run's config at once: a run that dies next leaves no empty config.yaml."""
    from bionets.engine.rundir import unused_name
    assert [unused_name(str(tmp_path), "a", lambda name: f"name: {name}\n") for _ in range(3)] == ["a", "a-2", "a-3"]
    assert [(tmp_path / name / "config.yaml").read_text() for name in ("a", "a-2", "a-3")] == \
        ["name: a\n", "name: a-2\n", "name: a-3\n"]


def test_resume_without_a_config_continues_the_checkpoints_run(tmp_path, capsys):
    """bionets train --resume CKPT: the checkpoint's own config (the default digits run would not match);
    settings that do not change the run (progress, device) may be overridden; the metrics log is the
    checkpoint's history, not the history plus a repeat of the epochs after it."""
    from bionets.cli import main
    train(fast_config(tmp_path, "train.epochs=3", name="a"), quiet=True)
    last = tmp_path / "a" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["epoch"], ckpt["step"], ckpt["history"] = 1, ckpt["step"] // 3, ckpt["history"][:1]   # as if stopped after epoch 1
    save_checkpoint(tmp_path / "a" / "epoch1.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert main(["train", "--resume", str(tmp_path / "a" / "epoch1.pt"), "train.device=cpu", "--quiet"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert main(["train", "--resume", str(last), "optim.lr=1", "--quiet"]) == 2
    assert "optim.lr: 0.2 -> 1" in capsys.readouterr().err


def test_resume_continues_in_the_checkpoints_directory_wherever_it_is_now(tmp_path, monkeypatch):
    """A run directory moved, or its checkpoint named from another folder (the saved out_dir 'runs'
    is relative to where the run started): the run went on in a new runs/NAME there, leaving the
    checkpoint's own directory at its epoch. Resumed into a new directory instead (name=...), the run
    starts with the source run's best.pt, which an epoch that scores no higher does not replace."""
    from bionets.cli import main
    from engine_helpers import FAST
    monkeypatch.chdir(tmp_path)
    assert main(["train", *FAST, "train.epochs=2", "name=a", "out_dir=runs", "--quiet"]) == 0
    ckpt = load_checkpoint(tmp_path / "runs" / "a" / "last.pt")
    ckpt["epoch"], ckpt["step"], ckpt["history"] = 1, ckpt["step"] // 2, ckpt["history"][:1]    # stopped after epoch 1
    save_checkpoint(tmp_path / "runs" / "a" / "last.pt", {k: v for k, v in ckpt.items() if k != "format"})
    shutil.move(tmp_path / "runs" / "a", tmp_path / "runs" / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = tmp_path / "runs" / "moved"
    assert main(["train", "--resume", str(moved / "last.pt"), "--quiet"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and load_checkpoint(moved / "last.pt")["epoch"] == 2
    assert not (tmp_path / "runs" / "a").exists() and not (tmp_path / "elsewhere" / "runs").exists()
    ckpt["best_top1"] = 100.0                             # no epoch beats it: best.pt only if the run starts with one
    save_checkpoint(moved / "epoch1.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert main(["train", "--resume", str(moved / "epoch1.pt"), "name=b", f"out_dir={tmp_path / 'runs'}",
                 "--quiet"]) == 0
    assert (tmp_path / "runs" / "b" / "best.pt").read_bytes() == (moved / "best.pt").read_bytes()


def test_a_glued_yaml_mapping_in_an_override_is_one_line(tmp_path):
    """{hidden:7} is YAML for {'hidden:7': None}: it used to pass, silently training the default width."""
    with pytest.raises(BionetsError, match="YAML reads 'hidden:7' as a key without a value: put a space"):
        fast_config(tmp_path, "model.kwargs={hidden:7}")


def test_a_comment_or_a_number_in_an_override_for_text_is_one_line_with_the_fix(tmp_path):
    """'name=my run #1' ran as 'my run' (YAML's comment dropped silently); name=2024 said only that
    it should be a string."""
    with pytest.raises(BionetsError, match=r"""override 'name=my run #1': YAML reads the text from '#' on as a """
                                           r"""comment and drops it: quote the value to keep it \(name="'my run #1'\""""):
        fast_config(tmp_path, "name=my run #1")
    assert fast_config(tmp_path, "name='my run #1'").name == "my run #1"
    assert fast_config(tmp_path, "name=run#1").name == "run#1"                # no comment without a space before it
    with pytest.raises(BionetsError, match=r"config key 'name': .* \(got 2024: YAML reads that as int, not text\): "
                                           r"quote it, name=\"'VALUE'\" in a shell"):
        fast_config(tmp_path, "name=2024")


def test_evaluate_skips_an_empty_batch():
    """A custom loader may yield an empty batch: it adds nothing (its mean loss, 0/0, made the test loss NaN)."""
    from bionets.engine.evaluate import evaluate
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    full = evaluate(model, [(x, y)], torch.device("cpu"))
    with_empty = evaluate(model, [(x[:3], y[:3]), (x[:0], y[:0]), (x[3:], y[3:])], torch.device("cpu"))
    assert with_empty == pytest.approx(full)


def test_model_init_starts_from_saved_weights_with_or_without_mechanisms(tmp_path):
    """model.init: plain weights into the same model, into the model with mechanisms added (RAA's
    ReLU form and STDS at D = 0 start as the identity, so the outputs are the trained model's), into
    a classifier of another size (re-initialized), and a model they do not fit (one line)."""
    from bionets.engine.model import build_model
    train(fast_config(tmp_path, "train.epochs=1", name="a"), quiet=True)
    saved = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    init = f"model.init={tmp_path / 'a' / 'last.pt'}"
    cpu = torch.device("cpu")
    plain, _, reports = build_model(fast_config(tmp_path, init), 10, 1, cpu)
    assert all(torch.equal(v, saved[k]) for k, v in plain.state_dict().items())
    assert "weights from" in str(reports[-1])
    mech, _, _ = build_model(fast_config(tmp_path, init, "mechanisms={raa: {}, stds: {}, arr: {}}"), 10, 1, cpu)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(mech.eval()(x), plain.eval()(x))
    other, _, reports = build_model(fast_config(tmp_path, init), 3, 1, cpu)
    assert other.get_classifier().out_features == 3 and "classifier re-initialized" in str(reports[-1])
    with pytest.raises(BionetsError, match="saved from '.+', does not fit this model, with or without its "
                                           "mechanisms"):
        build_model(fast_config(tmp_path, init, "model.kwargs={in_chans: 1, img_size: 8, hidden: 32}"), 10, 1, cpu)


class Labels(Hook):
    """Records the labels the training loop gives the hooks."""

    def __init__(self):
        self.seen = []

    def aux_loss(self, model, images, logits, targets):
        self.seen.append(targets.clone())


LABELS = Labels()


@register_mechanism("test_labels", Section, order=96)
def _apply_labels(model, cfg):
    return Applied(model, [LABELS], Report("test_labels"))


def test_hooks_get_each_mixed_images_larger_share_as_its_label(tmp_path):
    """Under mixup/cutmix the hooks (ARR) get the class with the larger share of each mixed image;
    they used to get the first image's class, even where the other one dominated."""
    from bionets.engine.distributed import init_distributed
    from bionets.engine.trainer import Trainer
    LABELS.seen.clear()
    trainer = Trainer(fast_config(tmp_path, "train.epochs=1", "data.mixup=0.8", "data.cutmix=1.0",
                                  "mechanisms={test_labels: {}}"), init_distributed("cpu"), quiet=True)
    mixup, soft_seen = trainer.data.mixup, []

    def recording(images, targets):
        images, soft = mixup(images, targets)
        soft_seen.append((targets.clone(), soft.clone()))
        return images, soft

    trainer.data.mixup = recording
    trainer.fit()
    assert len(LABELS.seen) == len(soft_seen) > 0
    assert all(torch.equal(labels, soft.argmax(1)) for labels, (_, soft) in zip(LABELS.seen, soft_seen))
    assert any(not torch.equal(labels, first) for labels, (first, _) in zip(LABELS.seen, soft_seen))


def test_a_model_that_does_not_fit_the_data_is_one_line(tmp_path):
    """model.kwargs.img_size=16 on 8x8 digits failed deep inside the first Linear layer."""
    with pytest.raises(BionetsError, match=r"failed on the first training batch, of shape \[64, 1, 8, 8\] from data "
                                           r"'digits' \(RuntimeError: .*check model.kwargs"):
        train(fast_config(tmp_path, "model.kwargs={in_chans: 1, img_size: 16}"), quiet=True)


@pytest.mark.parametrize("name, kwargs, error", [
    ("resnet18", "{global_pool: bogus}", r"\(AssertionError: Invalid pool type: bogus\)"),
    ("resnet18", "{output_stride: 7}", r"\(AssertionError\)"),          # timm's assert without a message
    ("convnext_atto", "{depths: [1, 1]}", r"\(IndexError: "),
    ("resnet18", "{act_layer: notanact}", None),
    # bionets' own small models refuse a misspelt option too (they ignored it)
    ("test_mlp", "{hiden: 32}", r"\(TypeError: .*unexpected keyword argument 'hiden'\)"),
    ("vgg11_cifar", "{drop_rate: 0.1}", r"\(TypeError: .*unexpected keyword argument 'drop_rate'\)")])
def test_options_timm_refuses_are_one_line_naming_them(name, kwargs, error):
    """timm checks its options with asserts, dict lookups and indexing: each refusal names the options
    given (it was a traceback of 35-48 lines for all but TypeError)."""
    from bionets.engine.model import create_model
    options = yaml.safe_load(kwargs)
    message = f"{name}.*{error}.*fix or remove" if error else "unknown activation 'notanact': give one of timm's"
    with pytest.raises(BionetsError, match=message):
        create_model(name, 10, 3, options)


def test_a_model_option_out_of_range_names_the_options_given(tmp_path):
    with pytest.raises(BionetsError, match=r"dropout probability.*check model.kwargs \{drop_rate: 5\} against"):
        train(fast_config(tmp_path, "model.name=resnet18", "model.kwargs={drop_rate: 5}"), quiet=True)
    # (a string where a number goes: ResNet-20 compares it in its forward, a TypeError)
    with pytest.raises(BionetsError, match=r"\(TypeError: .*check model.kwargs \{drop_rate: 'abc'\} against"):
        train(fast_config(tmp_path, "model.name=resnet20_cifar", "model.kwargs={drop_rate: abc}"), quiet=True)


def test_a_timm_size_check_is_one_line(tmp_path):
    """timm's ViT asserts the input size (an AssertionError, where PyTorch raises RuntimeError)."""
    with pytest.raises(BionetsError, match=r"failed on the first training batch, of shape \[64, 1, 8, 8\] from data "
                                           r"'digits' \(AssertionError: Input height \(8\) doesn't match model \(16\)"):
        train(fast_config(tmp_path, "model.name=vit_tiny_patch16_224",
                          "model.kwargs={in_chans: 1, img_size: 16, patch_size: 4, depth: 1}"), quiet=True)


def test_layout_free_weights_get_gradients_in_their_own_strides_for_ddp(tmp_path):
    """1x1 kernels and one-input-channel kernels are the same memory in both layouts, and their
    gradients come back in the strides of the layout the convolution chose: channels_last for
    ResNet-20's 1x1 shortcuts on channels_last maps, whatever the weight's strides. DDP compares
    every stride with its bucket's (made from the weight's) and warned in a 2-process run of the
    default config, whose shortcut weights had been made contiguous; under DDP each such gradient
    now takes its weight's strides (a view: the same memory)."""
    from bionets.engine.model import _with_strides, build_model, match_layout_free_grad_strides
    model = build_model(fast_config(tmp_path, "model.name=resnet20_cifar", "model.kwargs={}"), 10, 1,
                        torch.device("cpu"))[0].to(memory_format=torch.channels_last)
    free = {n: p for n, p in model.named_parameters() if p.ndim == 4 and p.shape[2:].numel() == 1}
    for p in free.values():                                          # either strides: the same memory
        p.data = p.data.clone(memory_format=torch.contiguous_format)
    x8 = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    model(x8).sum().backward()
    assert free and all(p.grad.stride() != p.stride() for p in free.values())      # what DDP warned about
    want = {n: p.grad.clone() for n, p in free.items()}
    model.zero_grad()
    match_layout_free_grad_strides(model)
    model(x8).sum().backward()
    assert all(p.grad.stride() == p.stride() and torch.equal(p.grad, want[n]) for n, p in free.items())
    # the other way round (contiguous gradients of channels_last weights), and only where size-1 dims differ
    g = torch.randn(8, 4, 1, 1)
    assert _with_strides((4, 1, 4, 4), g).stride() == (4, 1, 4, 4) and torch.equal(_with_strides((4, 1, 4, 4), g), g)
    assert _with_strides((1, 8, 1, 1), g) is None and _with_strides(g.stride(), g) is None
    # also where STDS parametrizes a weight: its original lives in a child of the conv
    stds = build_model(fast_config(tmp_path, "model.name=test_dit_convnext", "model.kwargs={}", "mechanisms={stds: {}}"),
                       10, 3, torch.device("cpu"))[0].to(memory_format=torch.channels_last)
    original = stds.stages[0].blocks[0].conv_dw.parametrizations.weight.original
    original.data = original.data.clone(memory_format=torch.contiguous_format)
    match_layout_free_grad_strides(stds)
    stds(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert original.grad.stride() == original.stride()


def test_channels_last_stays_off_on_the_cpu_for_narrow_strided_1x1_convolutions(tmp_path):
    """oneDNN's weight gradient of a 1x1 stride-2 convolution with a few input channels corrupts the
    heap in channels_last (a 2-process run of a [4, 4, 8]-wide ResNet-20 aborted in backward): auto
    keeps such models contiguous on the CPU, an explicit true is one line; CUDA is unaffected."""
    import bionets.models  # noqa: F401
    from bionets.engine.model import use_channels_last
    narrow = timm.create_model("resnet20_cifar", widths=[4, 4, 8], in_chans=1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_channels_last("auto", narrow, cpu) and use_channels_last("auto", narrow, cuda)
    assert use_channels_last("auto", timm.create_model("resnet20_cifar"), cpu)      # 16 channels and up
    with pytest.raises(BionetsError, match=r"channels_last=true: .*\(layer2\.0\.shortcut\.0\).*use train\.channels_last=auto"):
        use_channels_last(True, narrow, cpu)
    assert not use_channels_last(False, narrow, cpu)
    # evaluation and export of a checkpoint that asked for true (trained on a GPU): forward only, left off
    assert not use_channels_last(True, narrow, cpu, training=False)


def test_model_init_reports_which_training_state_it_kept(tmp_path):
    """ARR's class memory comes from a checkpoint trained with ARR (the report said 'kept fresh' of
    it) and starts fresh from one trained without (the report said so then too, rightly)."""
    from bionets.engine.model import build_model
    for name, mechanisms in (("both", "{raa: {}, arr: {}}"), ("raa", "{raa: {}}")):
        train(fast_config(tmp_path, "train.epochs=1", f"mechanisms={mechanisms}", name=name), quiet=True)
    run = ("mechanisms={raa: {}, arr: {}}",)
    model, _, reports = build_model(fast_config(tmp_path, f"model.init={tmp_path / 'both' / 'last.pt'}", *run), 10, 1,
                                    torch.device("cpu"))
    saved = load_checkpoint(tmp_path / "both" / "last.pt")["model"]
    assert torch.equal(model.arr_memory.mean, saved["arr_memory.mean"]) and model.arr_memory.seen.any()
    assert "training state from the checkpoint: arr_memory.mean, arr_memory.seen" in str(reports[-1])
    assert "kept fresh" not in str(reports[-1])
    model, _, reports = build_model(fast_config(tmp_path, f"model.init={tmp_path / 'raa' / 'last.pt'}", *run), 10, 1,
                                    torch.device("cpu"))
    assert not model.arr_memory.seen.any() and "2 buffer(s) kept fresh (arr_memory.mean, ...)" in str(reports[-1])
    assert "training state" not in str(reports[-1])


def test_an_error_mid_epoch_closes_the_progress_bar(tmp_path, request):
    """The bar is closed (cleared) before the error reaches the CLI, whose one-line message then
    starts a line of its own instead of following the bar's text."""
    from tqdm import tqdm
    terminal_stderr = request.getfixturevalue("terminal_stderr")     # (in the test: pytest's capture set up)
    Interrupt.armed = True
    with pytest.raises(KeyboardInterrupt) as caught:     # (its traceback holds the epoch's frame, as the CLI's does)
        train(fast_config(tmp_path, "train.progress=true", "mechanisms={test_interrupt: {at_step: 3}}"))
    assert caught.tb is not None and not tqdm._instances
    assert "epoch 1/" in terminal_stderr.getvalue()       # the bar was shown
    # the CLI's line says that nothing was kept (it hedged: "if it finished one")
    assert caught.value.bionets_kept.startswith("it finished no epoch, so it kept no checkpoint (its run directory")


def test_a_redirected_stderr_gets_no_progress_bar(tmp_path, capsys):
    """A log of stderr holds no frames of the bar (as experiments' and bench's), only what is said."""
    train(fast_config(tmp_path, "train.progress=true", "train.epochs=1"))
    assert "epoch 1/" not in capsys.readouterr().err


def test_console_line_formats_ema_and_mechanism_metrics_like_the_rest():
    from bionets.engine.metrics import console_line
    line = console_line({"epoch": 3, "test_top1": 10.0, "ema_test_top1": 10.0, "ema_test_loss": 2.302585,
                         "sparsity": 84.08333, "stds_d": 0.3, "sparsity/conv1": 50.0, "lr": 5.66e-07})
    assert line == ("epoch   3  test_top1 10.00  lr 5.66e-07  ema_test_top1 10.00  ema_test_loss 2.3026  "
                    "sparsity 84.08  stds_d 0.3")


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    train(fast_config(tmp_path, "train.epochs=1", name="a"), quiet=True)
    summary = train(fast_config(tmp_path, "train.epochs=1", f"resume={tmp_path / 'a' / 'last.pt'}", name="a"))
    out = capsys.readouterr().out
    assert "at epoch 1: the run is complete (1 of 1 epochs), nothing to train" in out and summary["epochs"] == 1
    # resumed into another run directory it left that directory behind without a checkpoint, once a call
    last = tmp_path / "a" / "last.pt"
    with pytest.raises(BionetsError, match=f"finished its run \\(1 of 1 epochs\\): nothing to train; evaluate it "
                                           f"with bionets eval {re.escape(str(last))}, or .* model.init="):
        train(fast_config(tmp_path / "elsewhere", "train.epochs=1", f"resume={last}", name="a"), quiet=True)
    assert not (tmp_path / "elsewhere").exists()


def test_a_resumed_run_removes_the_temporary_files_of_a_killed_write(tmp_path):
    """A process killed while writing a checkpoint (SIGKILL, a lost machine) leaves its temporary
    file; the run that continues in that directory removes it, and nothing else."""
    train(fast_config(tmp_path, "train.epochs=2", name="a"), quiet=True)
    run = tmp_path / "a"
    for stale in (".last.pt.x1y2z3.tmp", ".best.pt.abcdef.tmp", "notes.tmp"):
        (run / stale).write_bytes(b"partial")
    train(fast_config(tmp_path, "train.epochs=2", f"resume={run / 'last.pt'}", name="a"), quiet=True)
    assert sorted(p.name for p in run.glob("*.tmp")) == ["notes.tmp"]


def test_a_file_where_tensorboards_folder_goes_is_one_line(tmp_path):
    """A file named tb in the run directory a resumed run continues: TensorBoard's makedirs raised
    FileExistsError."""
    train(fast_config(tmp_path, "train.epochs=1", name="a"), quiet=True)
    run = tmp_path / "a"
    shutil.rmtree(run / "tb")
    (run / "tb").write_text("not a folder")
    with pytest.raises(BionetsError, match=re.escape(f"cannot make the output directory '{run / 'tb'}' ('{run / 'tb'}' "
                                                     "is a file): choose another out_dir (--out-dir) or name, or move "
                                                     "that file")):
        train(fast_config(tmp_path, "train.epochs=1", f"resume={run / 'last.pt'}", name="a"), quiet=True)
