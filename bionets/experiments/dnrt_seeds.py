"""``bionets experiment dnrt_seeds``: baseline, +RAA, +ARR and +both over several seeds (on digits by default).

Each variant adds mechanisms to ``configs/dnrt/digits.yaml`` (a 2-layer GELU MLP on the bundled
digits); every (variant, seed) pair is one real training run through the engine, in ``runs/<variant>_<seed>``
under the output directory (a rerun there replaces those runs, as it replaces its table; anything
else in ``runs/`` is left alone). Writes ``dnrt_seeds.csv`` (variant, seed, final and best test top-1, run
directory) and ``dnrt_seeds.png`` and returns a table of mean +- standard deviation per variant,
whatever the sign of the effect.
"""
from __future__ import annotations

import csv
import re
import shutil
import statistics
import sys
from pathlib import Path

from pydantic import NonNegativeFloat, PositiveInt

from bionets.configbase import PathText, quoted
from bionets.data.sources import data_options
from bionets.errors import BionetsError
from bionets.experiments import register_experiment
from bionets.progress import progress_bar

VARIANTS = {"baseline": "{}", "+RAA": "{raa: {}}", "+ARR": "{arr: {weight: ARR}}", "+both": "{raa: {}, arr: {weight: ARR}}"}


@register_experiment("dnrt_seeds")
def dnrt_seeds(out_dir: Path, *, seeds: PositiveInt = 5, epochs: PositiveInt = 15,
               arr_weight: NonNegativeFloat = 1.0, config: PathText = "dnrt/digits", data_root: PathText | None = None) -> str:
    """Baseline, +RAA, +ARR (weight ``arr_weight``) and +both trained on ``config`` (its dataset under
    ``data_root``, where it needs one) for ``seeds`` seeds of ``epochs`` epochs each: final test
    top-1, mean and spread per variant."""
    from bionets.config import load_config
    from bionets.engine.trainer import train

    where = [f"data.root={quoted(data_root)}"] if data_root is not None else []
    base = load_config(config, where)
    warmup, data = base.sched.warmup_epochs, base.data.name
    if warmup >= epochs:
        raise BionetsError(f"experiment dnrt_seeds: epochs={epochs} must exceed the warm-up of config {config} "
                           f"(sched.warmup_epochs={warmup:g}): raise epochs, or give a config with a shorter warm-up")
    _check_takes_dnrt(load_config(config, [f"mechanisms={VARIANTS['+both'].replace('ARR', '1')}", *where]), config)
    _remove_earlier_runs(out_dir / "runs")
    rows, runs = [], len(VARIANTS) * seeds
    with progress_bar("dnrt_seeds epochs", runs * epochs) as bar:
        for variant, mech in VARIANTS.items():
            for seed in range(seeds):
                name = f"{variant.strip('+')}_{seed}"
                cfg = load_config(config, [f"mechanisms={mech.replace('ARR', str(arr_weight))}", f"train.seed={seed}",
                                           f"train.epochs={epochs}", "train.progress=false",
                                           f"out_dir={quoted(out_dir / 'runs')}", f"name={name}", *where])
                bar.set_postfix_str(f"{variant} seed {seed}")
                with data_options("data_root=DIR", None):          # (the data errors name this experiment's option)
                    s = train(cfg, quiet=True, on_epoch=lambda record: bar.update())
                rows.append({"variant": variant, "seed": seed, "final_top1": s["final_top1"],
                             "best_top1": s["best_top1"], "run_dir": s["run_dir"]})
                # a line a run, for a log too (a CIFAR config's runs take hours)
                bar.write(f"dnrt_seeds: {variant} seed {seed}: final test top-1 {s['final_top1']:.2f}% "
                          f"({len(rows)} of {runs} runs; {s['run_dir']})", file=sys.stderr)
    with (out_dir / "dnrt_seeds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"DNRT on {data} ({config}, {seeds} seeds, {epochs} epochs, ARR weight {arr_weight}): final test top-1",
             "| variant | mean | std | min | max |", "|---|---|---|---|---|"]
    stats = {}
    for variant in VARIANTS:
        accs = [r["final_top1"] for r in rows if r["variant"] == variant]
        stats[variant] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
        lines.append(f"| {variant} | {stats[variant][0]:.2f} | {stats[variant][1]:.2f} | {min(accs):.2f} | {max(accs):.2f} |")
    _plot(rows, stats, f"{base.model.name} on {data}, {seeds} seed(s) of {epochs} epochs", out_dir / "dnrt_seeds.png")
    return "\n".join(lines)


def _check_takes_dnrt(cfg, config: str) -> None:
    """RAA and ARR applied to the config's model before any run (else a model that takes neither
    stopped the experiment after its baseline runs, hours of them on CIFAR)."""
    from bionets.engine.model import create_model
    from bionets.mechanisms import apply_mechanisms

    kwargs = dict(cfg.model.kwargs)
    model = create_model(cfg.model.name, kwargs.get("num_classes", 10), kwargs.get("in_chans", 3), kwargs)
    try:
        apply_mechanisms(model, cfg.mechanisms)
    except BionetsError as err:
        raise BionetsError(f"experiment dnrt_seeds: config={config} cannot take RAA and ARR ({err}); give config= a "
                           "config whose model has activation modules and a classifier, e.g. dnrt/digits") from None


def _remove_earlier_runs(runs: Path) -> None:
    """An earlier invocation's run directories (more seeds, too; a rerun's engine would otherwise
    give the new runs other names), and only those: ``<variant>_<seed>`` holding a run's config."""
    own = re.compile("(" + "|".join(v.strip("+") for v in VARIANTS) + r")_\d+(-\d+)?")
    for path in runs.glob("*_*"):
        if own.fullmatch(path.name) and (path / "config.yaml").is_file():
            shutil.rmtree(path, ignore_errors=True)


def _plot(rows: list[dict], stats: dict, title: str, path: Path) -> None:
    """Every seed's final top-1 as a dot, beside its variant's mean and standard deviation (dots,
    not bars: a bar's length from an axis that starts near the values would exaggerate them)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for i, variant in enumerate(stats):
        accs = [r["final_top1"] for r in rows if r["variant"] == variant]
        ax.scatter([i - 0.12] * len(accs), accs, s=14, color="0.55", zorder=2, label="one seed" if i == 0 else None)
        ax.errorbar([i + 0.12], [stats[variant][0]], yerr=[stats[variant][1]], fmt="o", color="C0", capsize=4,
                    zorder=3, label="mean +- std" if i == 0 else None)
    ax.set_xticks(range(len(stats)), list(stats))
    ax.set_xlim(-0.6, len(stats) - 0.4)
    ax.set_ylabel("final test top-1 (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"DNRT: {title}", fontsize=9)
    fig.savefig(path, dpi=120)
