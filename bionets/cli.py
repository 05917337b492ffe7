"""The ``bionets`` command: train, eval, models, configs, experiment, export, bench.

Every user error ends with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from bionets.configbase import check_path, load_yaml, quoted
from bionets.engine.signals import restore_handlers
from bionets.errors import BionetsError, Terminated, closest

USAGE_EXAMPLES = """examples:
  bionets train                                   # the embedded default: ResNet-20 on bundled digits
  bionets train cifar10/dit_resnet20 --data-root ~/data
  bionets train dnrt/digits train.epochs=5 mechanisms.arr.weight=1
  torchrun --nproc_per_node=4 -m bionets train cifar10/resnet20 --data-root ~/data
  bionets eval runs/digits/best.pt
  bionets models 'dit_*'
"""


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line, as every other error of the command (its
    subcommands' parsers are of the same class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def path(text: str) -> str:
    """argparse's type for a path argument: :func:`~bionets.configbase.check_path`'s refusals as
    its error line."""
    try:
        return check_path(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} {err}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bionets", description=__doc__.splitlines()[0].replace("``", ""),
                epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config (default: the embedded digits run)")
    t.add_argument("config", nargs="?", default=None, help="config path or bundled name (see 'bionets configs')")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=2")
    t.add_argument("--data-root", type=path, help="dataset folder (sets data.root)")
    t.add_argument("--out-dir", type=path, help="parent of the run directory (sets out_dir)")
    t.add_argument("--resume", type=path, help="checkpoint to continue from exactly (sets resume)")
    t.add_argument("--quiet", action="store_true",
                   help="print nothing but errors, and one line on stderr where the run directory asked for "
                        "holds an earlier run and this run goes to another (the results are in the run "
                        "directory: summary.json, metrics.jsonl)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    e.add_argument("checkpoint", type=path)
    e.add_argument("--data-root", type=path, help="dataset folder, if it moved since training")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda or cuda:N; not the "
                                                    "training's")

    m = sub.add_parser("models", help="list registered models with parameter counts")
    m.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. 'dit_*'")
    m.add_argument("--all", action="store_true", help="include every timm model, not only bionets'")

    sub.add_parser("configs", help="list the bundled configs")

    x = sub.add_parser("experiment", help="run an analysis experiment (gaussian, fewshot, eigen, responses, ...)")
    x.add_argument("name", nargs="?", help="the experiment (without one: the list of them)")
    x.add_argument("options", nargs="*", metavar="key=value")
    x.add_argument("--out", type=path, help="output directory (default runs/experiments/NAME)")
    x.add_argument("--options", dest="list_options", action="store_true",
                   help="list NAME's options with their defaults, and run nothing")

    b = sub.add_parser("bench", help="time every mechanism against its plain baseline (Markdown table + plot)")
    b.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu, cuda or cuda:N")
    b.add_argument("--mechanisms", help="comma-separated subset, e.g. quadratic,raa")
    b.add_argument("--widths", default=None, help="comma-separated widths (default 32,64,128)")
    b.add_argument("--batches", default=None, help="comma-separated batch sizes")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds of each case (default 3)")
    b.add_argument("--out", type=path, default="runs/bench", help="output folder for bench.md and bench.png")

    ex = sub.add_parser("export", help="bake reparameterized weights into a plain model state dict")
    ex.add_argument("checkpoint", type=path)
    ex.add_argument("output", type=path)
    ex.add_argument("--data-root", type=path, default=None,
                    help="dataset folder, for a checkpoint that does not record its class count and input channels "
                         "(bionets train's record them)")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights")
    return p


def _refuse_spaced_overrides(tokens: list[str]) -> None:
    """One line where an override was written with spaces around '=' (``train.epochs = 3``): it came
    as three words, the first read as a config name."""
    for k, token in enumerate(tokens):
        after = tokens[k + 1] if k + 1 < len(tokens) else None
        spaced = (token.startswith("=") and k > 0) or (token.endswith("=") and after is not None and "=" not in after)
        if spaced:
            start = k - 1 if token.startswith("=") else k
            words = tokens[start:start + 3 if token == "=" else start + 2]
            joined = "".join(words)
            raise BionetsError(f"'{' '.join(words)}': write an override as one word, {joined} (no spaces around '=')")


def cmd_train(args) -> int:
    from bionets.config import load_config
    from bionets.engine.trainer import train

    overrides = list(args.overrides)
    config = args.config
    _refuse_spaced_overrides([config, *overrides] if config is not None else overrides)
    if config is not None and "=" in config:  # 'bionets train key=value' with the default config
        overrides.insert(0, config)
        config = None
    for flag, key in ((args.data_root, "data.root"), (args.out_dir, "out_dir"), (args.resume, "resume")):
        if flag is not None:            # a path, quoted: not read as YAML ('runs #2', '2024', 'yes')
            overrides.append(f"{key}={quoted(flag)}")
    if config is None and args.resume:     # continue the checkpoint's own run, reading the file once
        from bionets.config import resume_config
        from bionets.engine.checkpoint import load_checkpoint
        saved = load_checkpoint(args.resume)
        train(resume_config(saved, overrides, args.resume), quiet=args.quiet, checkpoint=saved)
    else:
        train(load_config(config, overrides), quiet=args.quiet)
    return 0


def cmd_eval(args) -> int:
    from bionets.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data_root=args.data_root, ema=args.ema, device=args.device)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_models(args) -> int:
    import fnmatch

    from bionets.engine.model import bionets_models, count_parameters

    import timm

    names = timm.list_models() if args.all else bionets_models()
    if args.pattern:
        names = [n for n in names if fnmatch.fnmatch(n, args.pattern)]
        if not names:
            raise BionetsError(f"no model matches '{args.pattern}'{closest(args.pattern, bionets_models())}")
    if args.all and not args.pattern:      # counting builds each model: minutes for all of timm's
        print("\n".join(names))
        print(f"{len(names)} models; parameter counts for those a PATTERN matches "
              "(bionets models --all 'convnext*')", file=sys.stderr)
        return 0
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {count_parameters(name):>13,}", flush=True)
    return 0


def cmd_configs(args) -> int:
    from bionets.config import list_configs

    print("\n".join(list_configs()))
    return 0


def cmd_experiment(args) -> int:
    import yaml

    from bionets.experiments import experiment_names, get_experiment

    if args.name is None:       # (argparse said "required: name, key=value", and listed no experiment)
        raise BionetsError(f"experiment needs a name: {', '.join(experiment_names())} ('bionets experiment NAME "
                           "--options' lists its options)")
    fn = get_experiment(args.name)
    params = inspect.signature(fn).parameters
    valid = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
    if args.list_options:
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        print(f"{args.name}: {doc}" if doc else args.name)
        for name in valid:        # JSON, which the key=value parser (YAML) reads back
            default = params[name].default
            print(f"  {name}={json.dumps(list(default) if isinstance(default, tuple) else default, default=str)}")
        return 0
    options = {}
    for item in args.options:
        if "=" not in item:
            raise BionetsError(f"experiment option '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        if key not in valid:
            raise BionetsError(f"experiment '{args.name}' has no option '{key}'{closest(key, valid)} "
                               f"(options: {', '.join(valid)})")
        try:
            options[key] = load_yaml(raw)
        except yaml.YAMLError:
            raise BionetsError(f"experiment option '{item}' is not valid YAML (a list is [1, 2], a string "
                               "with spaces 'a b')") from None
    from bionets.engine.files import output_dir

    with output_dir(Path(args.out or Path("runs") / "experiments" / args.name), "another --out") as out:
        print(fn(out, **options))
    print(f"outputs in {out}")
    return 0


def cmd_export(args) -> int:
    from bionets.engine.evaluate import export_plain

    report = export_plain(args.checkpoint, args.output, data_root=args.data_root, ema=args.ema)
    print(report)
    return 0


def cmd_bench(args) -> int:
    from bionets.benchsuite import check_mechanisms, run_suite
    from bionets.engine.files import output_dir
    from bionets.engine.distributed import parse_device

    def ints(option: str, text: str | None) -> list[int] | None:
        if not text:
            return None
        parts = text.split(",")
        if not all(v.strip().isascii() and v.strip().isdigit() and int(v) > 0 for v in parts):   # ('²' is a digit)
            raise BionetsError(f"bench {option} takes comma-separated positive integers (e.g. 32,64), got {text!r}")
        return [int(v) for v in parts]

    if args.repeats < 1:
        raise BionetsError(f"bench --repeats must be >= 1, got {args.repeats}")
    device = parse_device(args.device, "--device")
    mechanisms = None if args.mechanisms is None else check_mechanisms(args.mechanisms.split(","))
    widths, batches = ints("--widths", args.widths), ints("--batches", args.batches)
    with output_dir(Path(args.out), "another --out") as out:       # before the measurements, not after
        print(run_suite(out, device=device, repeats=args.repeats, mechanisms=mechanisms, widths=widths,
                        batches=batches))
    print(f"table and plot in {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "models": cmd_models, "configs": cmd_configs,
            "experiment": cmd_experiment, "export": cmd_export,
            "bench": cmd_bench}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides come after options too (``--data-root D train.epochs=2``)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        dest = {"train": "overrides", "experiment": "options"}.get(args.command)
        if dest is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, dest, list(getattr(args, dest)) + extra)
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None, *, _default) -> None:
    """bionets' own warnings (a kernel that falls back to PyTorch) as one line on the command line,
    through tqdm so that an open progress bar stays whole; any other warning as Python shows it."""
    if str(message).startswith("bionets: "):
        from tqdm import tqdm

        tqdm.write(str(message), file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


_terminated_at: float | None = None       # when SIGTERM's handler last raised (time.monotonic)
STOPPING_S = 60.0      # a SIGTERM this soon after the last one leaves that one's clean-up to finish


def _raise_terminated(signum, frame) -> None:
    """SIGTERM's handler in a command: stop as Ctrl-C does. A second SIGTERM while the command winds
    down (a scheduler or a user repeating the stop) raised in the middle of the first one's clean-up
    and ended on a traceback: within STOPPING_S of the first it does nothing (a scheduler that will
    not wait sends SIGKILL). Later it raises again, for a process that went on because something
    swallowed the first (a ``__del__``, a library's ``except BaseException``)."""
    global _terminated_at
    now = time.monotonic()
    if _terminated_at is not None and now - _terminated_at < STOPPING_S:
        return
    _terminated_at = now
    if getattr(sys.unraisablehook, "func", None) is not _quiet_lost_workers:      # (once: not wrapped twice)
        sys.unraisablehook = functools.partial(_quiet_lost_workers, _default=sys.unraisablehook)
    raise Terminated()


def _quiet_lost_workers(unraisable, _default) -> None:
    """After a SIGTERM to the whole process group (torchrun's, a scheduler's), the DataLoader's
    workers die with the process, and its iterator's clean-up said so in a traceback after the
    command's one line ("DataLoader worker (pid N) is killed by signal: Terminated"): left out."""
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err).startswith("DataLoader worker") and "signal: Terminated" in str(err):
        return
    _default(unraisable)


def main(argv: list[str] | None = None) -> int:
    global _terminated_at
    args = _parse(argv)
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, _default=shown)
    # a SIGTERM (a scheduler's stop) ends a command as a Ctrl-C does, where nothing else handles it
    on_term = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if on_term:
        _terminated_at = None
    try:
        return _run(args, on_term)
    finally:
        warnings.showwarning = shown
        if on_term:         # (a SIGTERM that raises here came after the command's work: it changes nothing)
            restore_handlers({signal.SIGTERM: signal.SIG_DFL})


KEPT = "a run keeps the checkpoint of its last complete epoch (last.pt), if it finished one"


def _run(args: argparse.Namespace, on_term: bool) -> int:
    """The command's exit status: its own, or 2 after one error line, 130 after Ctrl-C, 143 after a
    SIGTERM, 141 for a run cut short by its closed output. SIGTERM's handler goes in inside the
    ``try``, so a SIGTERM right after it still ends on the one line."""
    try:
        if on_term:
            signal.signal(signal.SIGTERM, _raise_terminated)
        return COMMANDS[args.command](args)
    except BrokenPipeError as err:          # output piped into `head`, which ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not getattr(err, "bionets_run_cut", False):      # after a listing's lines, or a run's end: not an error
            return 0
        print(f"bionets: stopped: its output was closed (piped into head?); {getattr(err, 'bionets_kept', KEPT)}. "
              "To read a run as it goes, redirect it to a file", file=sys.stderr)
        return 128 + signal.SIGPIPE
    except BionetsError as err:
        print(f"bionets: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # (what a run keeps; an experiment or a benchmark keeps no checkpoint)
        kept = getattr(err, "bionets_kept", KEPT if args.command == "train" else None)
        stopped = "stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted"
        print(f"bionets: {stopped}" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130


if __name__ == "__main__":
    raise SystemExit(main())
