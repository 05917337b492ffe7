"""The bionets command: exit codes, one-line errors, listings."""
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bionets.cli import main
from bionets.engine.checkpoint import load_checkpoint
from engine_helpers import FAST


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bionets", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["train", "model.name=resnet21_cifar"], "unknown model 'resnet21_cifar' (did you mean:"),
    (["train", "model.name=nope"], "unknown model 'nope' (valid: dit_convnext_base,"),   # bionets' own, not timm's first
    (["train", "model.name=resnet20"], "(did you mean: dit_resnet20, resnet20_cifar, resnet200?)"),  # ours first
    (["train", "model.name=convnext_tiy"], "(did you mean: convnext_tiny,"),
    (["train", "data.name=cifar10"], "data.root"),
    (["train", "train.epoch=1"], "unknown config key 'train.epoch' (did you mean: epochs?)"),
    (["train", "data.name=cifar11"], "unknown dataset 'cifar11'"),
    (["train", "model.kwargs={in_chans: 3}"], "model.kwargs.in_chans=3, but the data has 1 channels: leave in_chans "
     "out of model.kwargs"),
    (["eval", "/nonexistent/best.pt"], "does not exist"),
    (["eval", "/"], "'/' is a directory, and it holds no best.pt or last.pt"),
    (["eval", str(Path(__file__).parent.parent / "configs" / "digits.yaml")], "is a text file, not a checkpoint (a config?)"),
    (["experiment", "nosuch"], "unknown experiment 'nosuch'"),
    (["experiment", "bogus"], "unknown experiment 'bogus' (did you mean: gaussian?); experiments: dnrt_seeds, eigen, fewshot, "
     "gaussian, responses"),
    (["experiment", "fewshot", "data_root=/nonexistent/bionets"], "is missing: put mnist there (see docs/data.md) or "
     "give its location with data_root=DIR (MNIST's files, or grayscale image folders DIR/train and DIR/val)"),
    (["experiment", "gaussian", "seeds=[1,"], "is not valid YAML"),
    (["train", "train.device=gpu"], "train.device=gpu is not a device bionets runs on: use auto, cpu"),
    (["train", "train.device=meta"], "train.device=meta is not a device bionets runs on"),
    (["bench", "--widths", "0"], "bench --widths takes comma-separated positive integers"),
    (["bench", "--widths", "3,\u00b2"], "bench --widths takes comma-separated positive integers"),   # ('²'.isdigit())
    (["experiment", "eigen", "data_root=~nosuchuser/x"], "option data_root='~nosuchuser/x': starts with '~nosuchuser'"),
    (["bench", "--device", "gpu"], "--device gpu is not a device bionets runs on: use auto, cpu"),
    (["bench", "--mechanisms="], "bench has no case for mechanism '' (cases: quadratic, raa, stds, arr)"),
    (["train", "data.name=cifar10", f"data.root={sys.executable}"], "is a file, not a folder: give the folder"),
    (["train", "optim.kwargs={foo: 1}"], "optim.kwargs {'foo': 1} does not fit the sgd optimizer"),
    (["experiment", "dnrt_seeds", "config=digits", "epochs=1"], "epochs=1 must exceed the warm-up of config digits"),
    (["experiment"], "experiment needs a name: dnrt_seeds, eigen, fewshot, gaussian, responses ('bionets experiment "
     "NAME --options' lists its options)"),
    (["experiment", "eigen", "show=64"], "option show=64: Input should be less than or equal to 10"),
    (["experiment", "dnrt_seeds", "config=stds/digits_sine", "epochs=9"], "config=stds/digits_sine cannot take RAA and "
     "ARR (raa found no activation module"),            # before any run (it stopped after the baseline's)
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    """In this process (a new one costs ~6 s of imports; the test below runs some that way)."""
    assert main(args + [f"out_dir={tmp_path}"] if args[0] == "train" else args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_rejected_option_leaves_no_output_directory_and_argparse_errors_are_one_line(tmp_path, capsys):
    """An experiment or bench whose options are refused removes the directories it made for its
    outputs; a malformed option (argparse's error) is one line too, with where to read the usage."""
    assert main(["experiment", "gaussian", "dim=0", "--out", str(tmp_path / "a" / "b")]) == 2
    assert main(["bench", "--mechanisms", "raa,nosuch", "--out", str(tmp_path / "c")]) == 2
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--repeats", "x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("bionets bench: error: argument --repeats: invalid int value: 'x' "
                                       "(see 'bionets bench --help')\n")
    with pytest.raises(SystemExit):         # a path with a line break, or naming no user's home: argparse's line
        main(["export", "x.pt", "~nosuchuser/plain.pt"])
    assert capsys.readouterr().err == ("bionets export: error: argument output: '~nosuchuser/plain.pt' starts with "
                                       "'~nosuchuser', and no such user has a home folder here: write the path in "
                                       "full (see 'bionets export --help')\n")


@pytest.mark.parametrize("args, message", [
    (["train", "train.epoch=1"], "unknown config key 'train.epoch' (did you mean: epochs?)"),
    (["eval", "/nonexistent/best.pt"], "does not exist"),
    (["experiment", "nosuch"], "unknown experiment 'nosuch'"),
])
def test_bad_input_in_a_new_process_prints_one_line_and_nothing_else(args, message, tmp_path):
    """The whole stderr of the command, imports and warnings included, is the one error line."""
    out = cli(*args, f"out_dir={tmp_path}") if args[0] == "train" else cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_eval_runs_on_this_machines_device_not_the_trainings(tmp_path, capsys, monkeypatch):
    """A checkpoint trained with train.device=cuda was refused on a machine without a GPU, and eval
    took no option to change it; a run directory given for a checkpoint names both of its files."""
    import torch

    from bionets.engine.checkpoint import save_checkpoint
    assert main(["train", *FAST, "train.epochs=1", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    ckpt["config"]["train"]["device"] = "cuda"
    save_checkpoint(tmp_path / "gpu.pt", {k: v for k, v in ckpt.items() if k != "format"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gpu.pt")]) == 0
    assert "test_top1: " in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "gpu.pt"), "--device", "cuda"]) == 2
    assert "--device cuda, but this machine has no CUDA device" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "r")]) == 2
    assert (f"pass {tmp_path / 'r' / 'best.pt'} (its best epoch) or {tmp_path / 'r' / 'last.pt'} (its latest, which "
            "--resume continues)") in capsys.readouterr().err


def test_export_of_the_ema_weights(tmp_path, capsys):
    """--ema bakes the EMA weights (STDS's, reparameterized, here) into the plain state; a checkpoint
    without them is one line."""
    import timm
    import torch
    args = ["train", *FAST, "train.epochs=1", "mechanisms={stds: {d_max: 0.01}}", f"out_dir={tmp_path}", "--quiet"]
    assert main([*args, "name=ema", "train.ema_decay=0.5"]) == 0
    for flags, out in (([], "plain.pt"), (["--ema"], "ema.pt")):
        assert main(["export", str(tmp_path / "ema" / "last.pt"), str(tmp_path / out), *flags]) == 0
    assert "exported test_mlp (EMA weights) to " in capsys.readouterr().out
    plain, ema = (load_checkpoint(tmp_path / f, exported=True)["plain_model"] for f in ("plain.pt", "ema.pt"))
    assert plain.keys() == ema.keys() and any(not torch.equal(plain[k], ema[k]) for k in plain)
    timm.create_model("test_mlp", in_chans=1, img_size=8, num_classes=10).load_state_dict(ema)
    assert main([*args, "name=plain"]) == 0
    assert main(["export", str(tmp_path / "plain" / "last.pt"), str(tmp_path / "x.pt"), "--ema"]) == 2
    assert "has no EMA weights" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "imagefolder"])
def test_eval_reads_the_test_split_only(dataset, tmp_path, capsys):
    """bionets eval needs the test split alone: with the training files gone (an ImageNet val folder
    copied to another machine, CIFAR's test_batch) it prints what it printed with them."""
    import shutil

    from bionets.data.fakes import write_cifar, write_image_folder, write_mnist
    root = tmp_path / "data"
    write, chans, size, train_files = {
        "cifar10": (lambda: write_cifar(root), 3, 32, lambda: (root / "cifar-10-batches-py").glob("data_batch_*")),
        "mnist": (lambda: write_mnist(root), 1, 28, lambda: (root / "MNIST" / "raw").glob("train-*")),
        "imagefolder": (lambda: write_image_folder(root, per_class=4), 3, 16, lambda: [root / "train"]),
    }[dataset]
    write()
    assert main(["train", "model.name=test_mlp", f"model.kwargs={{in_chans: {chans}, img_size: {size}}}",
                 f"data.name={dataset}", f"data.img_size={size}" if dataset == "imagefolder" else "data.augment=true",
                 "data.batch_size=4", "train.epochs=1", "sched.warmup_epochs=0", f"--data-root={root}",
                 f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r" / "last.pt")]) == 0
    with_train = capsys.readouterr().out
    for path in list(train_files()):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(["eval", str(tmp_path / "r" / "last.pt")]) == 0
    assert capsys.readouterr().out == with_train and "test_top1" in with_train


def test_eval_on_data_of_other_class_names_says_so(tmp_path, capsys):
    """The checkpoint records the class names it trained on: an image folder of other classes (as
    many) was scored without a word."""
    from bionets.data.fakes import write_image_folder
    write_image_folder(tmp_path / "pets", classes=("cat", "dog"))
    write_image_folder(tmp_path / "bugs", classes=("ant", "bee"))
    assert main(["train", "model.name=test_mlp", "model.kwargs={in_chans: 3, img_size: 16}", "data.name=imagefolder",
                 "data.img_size=16", "data.batch_size=2", "train.epochs=1", "sched.warmup_epochs=0",
                 f"--data-root={tmp_path / 'pets'}", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r" / "last.pt")]) == 0
    assert capsys.readouterr().err == ""
    assert main(["eval", str(tmp_path / "r" / "last.pt"), "--data-root", str(tmp_path / "bugs")]) == 0
    assert ("bionets: note: the data's classes are not the ones checkpoint" in (err := capsys.readouterr().err)
            and "(class 0: 'ant' here, 'cat' in training): it is scored by class index" in err)


@pytest.mark.parametrize("args, said", [
    (["train", "train.device=cuda"], "train.device=cuda"),
    (["experiment", "fewshot", "device=cuda:1"], "option device=cuda:1"),
    (["bench", "--device", "cuda"], "--device cuda"),
])
def test_cuda_asked_for_without_cuda_is_one_line_for_every_command(args, said, tmp_path, capsys, monkeypatch):
    """One parser serves train.device, experiment options and bench's --device, with one wording."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = [f"out_dir={tmp_path}"] if args[0] == "train" else ["--out", str(tmp_path)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bionets: error: {said}, but this machine has no CUDA device: use cpu or auto"]


@pytest.mark.parametrize("option, message", [
    ("seeds=0", "option seeds=0: Input should be greater than 0"),
    ("fractions=[0.1,1.5]", "option fractions.1=1.5: Input should be less than or equal to 1"),
    ("weight_decay=-1", "option weight_decay=-1: Input should be greater than or equal to 0"),
    ("max_iter=abc", "option max_iter='abc': Input should be a valid integer"),
    ("device=gpu", "option device=gpu is not a device bionets runs on"),
    ("fractions=[]", "option fractions=[]: List should have at least 1 item"),
    ("seeds=true", "option seeds=True: takes a number, not true or false"),
    ("rank=false", "option rank=False: takes a number, not true or false"),
    ("gaussian separation=-1", "option separation=-1: Input should be greater than 0"),
    ("gaussian data_seed=99999999999999999999", "option data_seed=99999999999999999999: Input should be less than"),
    ("gaussian cases=[]", "option cases=[]: List should have at least 1 item"),
])
def test_bad_experiment_options_are_one_line_before_any_work(option, message, tmp_path, capsys):
    """Checked against the experiment's annotations before it trains anything (a fraction of 1.5
    used to fail after the other fractions had trained; seeds=0 ended on an IndexError; an empty list
    left an empty CSV; a separation of -1 failed inside the data's own config)."""
    name, option = option.split(" ") if " " in option else ("fewshot", option)
    assert main(["experiment", name, option, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())


def test_experiment_options_are_listed_in_a_form_the_command_line_reads_back(capsys):
    import yaml

    assert main(["experiment", "gaussian", "--options"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gaussian: Quadratic neuron vs two-layer MLP")
    options = dict(line.strip().split("=", 1) for line in lines[1:])
    assert yaml.safe_load(options["cases"]) == ["identical", "different"] and options["boundary_n"] == "null"
    assert "n_max" in options and "seeds" in options


def test_corrupt_checkpoint_exits_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = cli("eval", str(bad))
    assert out.returncode == 2 and "corrupt or truncated" in out.stderr and "Traceback" not in out.stderr


def test_train_then_eval_and_export(tmp_path, capsys):
    assert main(["train", *FAST, "train.epochs=1", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "r" / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "test_top1:" in out and "model: test_mlp" in out
    for overwritten in ("best.pt", "last.pt"):       # export never replaces a run's checkpoint
        assert main(["export", str(tmp_path / "r" / "best.pt"), str(tmp_path / "r" / overwritten)]) == 2
        assert "export would overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "r" / "best.pt"), str(tmp_path / "plain.pt")]) == 0
    assert f"to {tmp_path / 'plain.pt'}: no reparameterized tensor to bake, " in capsys.readouterr().out
    assert "plain_model" in load_checkpoint(tmp_path / "plain.pt", exported=True)
    plain = str(tmp_path / "plain.pt")
    for command in (["eval", plain], ["train", *FAST, f"out_dir={tmp_path}", "--resume", plain]):
        assert main(command) == 2
        assert "holds exported plain weights ('bionets export'), not a training run" in capsys.readouterr().err


@pytest.mark.parametrize("change, cause", [(("train", "old_option", 1), "unknown config key 'train.old_option'"),
                                           (("model", "name", "removed_model_xyz"), "model 'removed_model_xyz' is not")])
def test_a_checkpoint_whose_config_this_version_cannot_read_names_the_checkpoint(tmp_path, capsys, change, cause):
    """A checkpoint of another bionets version (a key this one lacks, a model it does not have): the
    message blamed the user's config for a key they never typed."""
    from bionets.engine.checkpoint import save_checkpoint
    assert main(["train", *FAST, "train.epochs=1", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    section, key, value = change
    state["config"][section][key] = value
    other = tmp_path / "other.pt"
    save_checkpoint(other, state)
    for command in (["eval", str(other)], ["train", "--resume", str(other)],
                    ["export", str(other), str(tmp_path / "x.pt")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"checkpoint '{other}' holds a config this bionets cannot read ({cause}" in err, (command, err)
        assert f"start a new run from its weights with model.init={other}" in err


def test_edited_ema_data_info_or_data_section_is_one_line(tmp_path, capsys):
    """eval --ema on an 'ema' that is not a state dict, export on a 'data_info' without its counts, and
    eval --data-root on a checkpoint whose config has no 'data' section raised AttributeError,
    KeyError or TypeError."""
    from bionets.engine.checkpoint import save_checkpoint
    assert main(["train", *FAST, "train.epochs=1", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    edited = tmp_path / "edited.pt"
    for change, command, said in (
            ({"ema": [1]}, ["eval", "--ema"], "holds a list as its 'ema' entry"),
            ({"data_info": {}}, ["export"], "holds num_classes=None in its 'data_info' entry, which gives the data's "
                                            "class and channel counts"),
            ({"data_info": {"num_classes": "10", "in_chans": 1}}, ["export"], "holds num_classes='10' in its"),
            ({"config": {k: v for k, v in state["config"].items() if k != "data"}},
             ["eval", "--data-root", str(tmp_path)], None)):
        save_checkpoint(edited, {**state, **change})
        args = [*command, str(edited)] + ([str(tmp_path / "x.pt")] if command == ["export"] else [])
        code = main(args)
        err = capsys.readouterr().err
        if said is None:        # no data section: the default (digits, bundled) with the root given
            assert code == 0, err
        else:
            assert code == 2 and f"checkpoint '{edited}' {said}" in err, (command, err)


def test_export_needs_no_data_and_leaves_arr_memory_out(tmp_path, capsys):
    """A checkpoint records its data's shape, so export runs where the dataset is not (the usual place
    to export); the export and model.init leave out ARR's class memory (training-only state), so the
    exported weights load strictly into the bare model and an ARR run starts a run without ARR."""
    import shutil
    import timm
    import torch
    from bionets.data.fakes import write_cifar
    write_cifar(tmp_path / "data", n_train=64)
    args = ["train", "model.name=test_mlp", "model.kwargs={in_chans: 3, img_size: 32}", "data.name=cifar10",
            f"data.root={tmp_path / 'data'}", "data.batch_size=32", "train.epochs=1", "sched.warmup_epochs=0", "train.progress=false",
            f"out_dir={tmp_path}", "--quiet"]
    assert main([*args, "name=arr", "mechanisms={arr: {weight: 1.0}}"]) == 0
    shutil.move(tmp_path / "data", tmp_path / "moved")
    out = cli("eval", str(tmp_path / "arr" / "last.pt"))             # eval has --data-root, not data.download
    assert out.returncode == 2 and "give its location with --data-root DIR" in out.stderr, out.stderr
    assert "download" not in out.stderr
    assert main(["export", str(tmp_path / "arr" / "last.pt"), str(tmp_path / "plain.pt")]) == 0
    plain = load_checkpoint(tmp_path / "plain.pt", exported=True)["plain_model"]
    assert not [k for k in plain if k.startswith("arr_memory")]
    timm.create_model("test_mlp", in_chans=3, img_size=32).load_state_dict(plain)
    shutil.move(tmp_path / "moved", tmp_path / "data")
    assert main([*args, "name=plain", f"model.init={tmp_path / 'arr' / 'last.pt'}"]) == 0
    start = load_checkpoint(tmp_path / "arr" / "last.pt")["model"]
    assert not [k for k in load_checkpoint(tmp_path / "plain" / "last.pt")["model"] if k.startswith("arr_memory")]
    assert any(k.startswith("arr_memory") for k in start) and torch.is_tensor(start["arr_memory.mean"])
    # into a run with ARR the memory comes along (it was dropped before the mechanisms were applied)
    from bionets.config import load_config
    from bionets.engine.model import build_model
    cfg = load_config(None, [a for a in args[1:] if a != "--quiet"] + [f"model.init={tmp_path / 'arr' / 'last.pt'}",
                                                                      "mechanisms={arr: {weight: 1.0}}"])
    model = build_model(cfg, 10, 3, torch.device("cpu"))[0]
    assert torch.equal(model.arr_memory.mean, start["arr_memory.mean"]) and start["arr_memory.seen"].any()
    # RAA's modules stay in the model: the export says what to load it into
    from bionets.conversion import convert
    assert main([*args, "name=raa", "mechanisms={raa: {}, arr: {weight: 1.0}}"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "raa" / "last.pt"), str(tmp_path / "raa.pt")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("; it holds the modules of raa: load it into test_mlp with them "
                                                     "applied (bionets.convert with the saved config's settings), not "
                                                     "into the bare model")
    plain = load_checkpoint(tmp_path / "raa.pt", exported=True)["plain_model"]
    convert(timm.create_model("test_mlp", in_chans=3, img_size=32), activation="raa")[0].load_state_dict(plain)


def test_an_output_path_blocked_by_a_file_or_directory_is_one_line(tmp_path, capsys):
    """Output paths that cannot be written ended on NotADirectoryError, IsADirectoryError or
    FileExistsError tracebacks; each is one line naming the path and what is in the way (bench's
    before it measures anything)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    blocked = f"'{tmp_path / 'afile'}' is a file"
    for args, said in ((["train", *FAST, "--out-dir", str(tmp_path / "afile")], blocked),
                       (["experiment", "eigen", "--out", str(tmp_path / "afile" / "x")], blocked),
                       (["bench", "--out", str(tmp_path / "afile")], blocked),
                       (["export", str(tmp_path / "none.pt"), str(tmp_path / "adir")], "does not exist")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert main(["train", *FAST, "train.epochs=1", f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    assert main(["export", str(tmp_path / "r" / "last.pt"), str(tmp_path / "adir")]) == 2
    assert f"cannot write '{tmp_path / 'adir'}': it is a directory" in capsys.readouterr().err
    if Path("/proc/self").is_dir():        # a folder that exists but takes no new file (even as root)
        assert main(["export", str(tmp_path / "r" / "last.pt"), "/proc/x.pt"]) == 2
        assert capsys.readouterr().err.strip() == ("bionets: error: cannot write '/proc/x.pt' (No such file or "
                                                   "directory): give a path in a folder you can write to")


def test_path_flags_are_paths_not_yaml(tmp_path):
    """--out-dir 'runs #2' is that folder (YAML read ' #2' as a comment), and '2024' a folder name."""
    for name in ("runs #2", "2024", "runs\U0001F600"):
        assert main(["train", *FAST, "train.epochs=1", "name=r", "--out-dir", str(tmp_path / name), "--quiet"]) == 0
        assert (tmp_path / name / "r" / "last.pt").is_file()


def test_models_and_configs_listings(capsys):
    assert main(["models", "test_*"]) == 0
    out = capsys.readouterr().out
    assert "test_mlp" in out and "4,810" in out        # 64*64+64 + 64*10+10
    assert main(["configs"]) == 0
    assert "digits" in capsys.readouterr().out.split()
    assert main(["models", "zzz*"]) == 2
    capsys.readouterr()
    assert main(["models", "--all"]) == 0              # names only: counting all of timm's took minutes
    listed = capsys.readouterr()
    assert "convnext_tiny\n" in listed.out and "parameter counts for those a PATTERN matches" in listed.err


def _ctrl_c_acts() -> None:
    """(In the child) Ctrl-C as at a terminal: a suite started in the background has it ignored, and
    its children inherit that, so a run would not stop on it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_ctrl_c_and_sigterm_leave_last_complete_checkpoint(tmp_path, signum, code, said):
    """Ctrl-C, and a scheduler's SIGTERM (which ended the process where it stood, a partial
    temporary checkpoint included), stop a run with one line naming its last checkpoint."""
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "bionets", "train", *FAST, "train.epochs=200",
                             f"out_dir={tmp_path}", "name=r"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_acts)
    last = tmp_path / "r" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:       # a hang: fail with where every thread of the run stood
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"the run did not stop on {said}:\n" + proc.communicate()[1][-4000:])
    assert proc.returncode == code and said in err and "Traceback" not in err, err[-3000:]
    epoch = load_checkpoint(last)["epoch"]
    assert epoch >= 1
    assert f"bionets: {said}; {last} holds epoch {epoch} of 200: continue with bionets train --resume {last}" in err
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def _first_line_then_closed(*args) -> subprocess.CompletedProcess:
    """``bionets ARGS | head -1``: the first line read, then the pipe closed."""
    proc = subprocess.Popen([sys.executable, "-m", "bionets", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, first, err)


def test_a_run_whose_output_is_closed_stops_with_one_line(tmp_path):
    """``bionets train | head -1`` ended the run at its next line with exit status 0 and not a word:
    a cut run looked like a finished one. A listing piped into head is still fine."""
    cut = _first_line_then_closed("train", *FAST, "train.epochs=200", f"out_dir={tmp_path}", "name=r")
    assert cut.stdout.startswith("bionets: model test_mlp") and cut.returncode == 141, cut.stderr[-2000:]
    last = tmp_path / "r" / "last.pt"
    epoch = load_checkpoint(last)["epoch"]
    assert cut.stderr.splitlines()[-1] == (f"bionets: stopped: its output was closed (piped into head?); {last} holds "
                                           f"epoch {epoch} of 200: continue with bionets train --resume {last}. To "
                                           "read a run as it goes, redirect it to a file")
    listed = _first_line_then_closed("models", "--all")
    assert listed.returncode == 0 and listed.stderr.count("\n") <= 1, listed.stderr


def test_a_sigterm_just_after_the_handler_goes_in_is_the_one_line(monkeypatch, capsys):
    """A SIGTERM between installing the command's handler and entering the ``try`` that reports it
    ended on a traceback."""
    import os
    import bionets.cli as cli
    real_signal = signal.signal

    def then_terminated(signum, handler):
        before = real_signal(signum, handler)
        if handler is cli._raise_terminated:
            os.kill(os.getpid(), signal.SIGTERM)         # Python runs the handler at its next check
        return before

    monkeypatch.setattr(cli.signal, "signal", then_terminated)
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "models": lambda args: pytest.fail("the command ran")})
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert main(["models"]) == 143
    assert capsys.readouterr().err == "bionets: stopped by SIGTERM\n"        # (no run, no checkpoint to name)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_sigterm_quiets_the_dataloader_workers_it_killed_too(monkeypatch):
    """A SIGTERM to the process group (torchrun's, a scheduler's) kills data.workers' processes too:
    the loader's clean-up printed "DataLoader worker ... is killed by signal: Terminated" in a
    traceback after the one line. The handler installs a filter of exactly that report."""
    import bionets.cli as cli
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(cli, "_terminated_at", None)
    with pytest.raises(KeyboardInterrupt):
        cli._raise_terminated(signal.SIGTERM, None)
    lost, other = (SimpleNamespace(exc_value=RuntimeError(text)) for text in
                   ("DataLoader worker (pid 11419) is killed by signal: Terminated. ", "DataLoader worker failed"))
    sys.unraisablehook(lost)
    sys.unraisablehook(other)
    assert seen == [other]


def test_an_interrupted_experiment_names_no_checkpoint(monkeypatch, capsys):
    """A run's line ("a run keeps the checkpoint of its last complete epoch") made no sense for an
    experiment or a benchmark, which keep none."""
    import bionets.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "experiment": interrupted, "train": interrupted})
    assert main(["experiment", "eigen"]) == 130
    assert capsys.readouterr().err == "bionets: interrupted\n"
    assert main(["train"]) == 130
    assert capsys.readouterr().err == f"bionets: interrupted; {cli.KEPT}\n"


@pytest.mark.parametrize("words, said", [
    (["train.epochs", "=", "3"], "'train.epochs = 3': write an override as one word, train.epochs=3"),
    (["dnrt/digits", "train.epochs", "=3"], "'train.epochs =3': write an override as one word, train.epochs=3"),
    (["train.epochs=", "3"], "'train.epochs= 3': write an override as one word, train.epochs=3"),
    (["train.epochs:3"], "no config file named 'train.epochs:3': an override is written key=value, e.g. train.epochs=3"),
    (["train.epochs:", "3"], "no config file named 'train.epochs:': an override is written key=value, e.g. "
     "train.epochs=VALUE (no spaces)"),
])
def test_an_override_written_with_spaces_or_a_colon_says_how_to_write_it(words, said, capsys):
    """The words of 'train.epochs = 3' were read as a config named 'train.epochs'."""
    from bionets.cli import main
    assert main(["train", *words]) == 2
    assert said in capsys.readouterr().err


def test_overrides_may_follow_options():
    from bionets.cli import _parse

    args = _parse(["train", "cifar10/resnet20", "--data-root", "/data", "train.epochs=2", "optim.lr=0.05"])
    assert args.config == "cifar10/resnet20" and args.data_root == "/data"
    assert args.overrides == ["train.epochs=2", "optim.lr=0.05"]
    with pytest.raises(SystemExit):
        _parse(["train", "--data-root", "/data", "--bogus"])
    with pytest.raises(SystemExit):
        _parse(["eval", "ckpt.pt", "train.epochs=2"])


def test_bench_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys, request):
    """A width too large for the device ended on the allocator's traceback (raised here by a stand-in:
    a real 19 TB request could succeed under memory overcommit and take the machine down)."""
    import bionets.benchsuite

    def too_big(case, width, batch, device, repeats):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 19199999999808 bytes")
    monkeypatch.setattr(bionets.benchsuite, "run_case", too_big)
    assert main(["bench", "--widths", "99999999999", "--mechanisms", "raa", "--batches", "1", "--device", "cpu",
                 "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().startswith("bionets: error: bench ran out of memory at width 99999999999, "
                                                      "batch 1 on cpu (RuntimeError: DefaultCPUAllocator")
    assert not (tmp_path / "b").exists()
    terminal = request.getfixturevalue("terminal_stderr")   # the progress bar is cleared before the error line
    assert main(["bench", "--widths", "8", "--mechanisms", "raa", "--batches", "1", "--device", "cpu",
                 "--out", str(tmp_path / "b")]) == 2
    assert "bench cases:" in terminal.getvalue()
    assert terminal.getvalue().rsplit("\r", 1)[1].startswith("bionets: error: bench ran out of memory at width 8")


def test_bionets_warnings_are_one_line_on_the_command_line(capsys):
    """A kernel's fallback warning printed with its file path and source line, under the progress bar."""
    from bionets.cli import _show_warning
    _show_warning(UserWarning("bionets: RAA's CPU kernels cannot be built here (x); using PyTorch"), UserWarning,
                  "/x/raa.py", 182, _default=None)
    assert capsys.readouterr().err == "bionets: RAA's CPU kernels cannot be built here (x); using PyTorch\n"
    seen = []
    _show_warning(UserWarning("other"), UserWarning, "/x/y.py", 3, _default=lambda *a: seen.append(a))
    assert len(seen) == 1 and str(seen[0][0]) == "other" and not capsys.readouterr().err   # Python's own display
