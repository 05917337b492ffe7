"""``bionets experiment responses``: per-class distributions of a trained model's aggregated responses.

Collects, on the test split, the aggregated responses (the features feeding the classifier: pooled
in a CNN; in a ViT the final class token after the last norm, where ARR itself reads the class token
after every block, before that norm) of a checkpoint and, with ``compare=``, of a second
one (e.g. without DNRT), and draws violin plots of the first ``channels`` channels for each of the
first ``classes`` classes, the two runs side by side. With ARR the responses of a class are
expected to be narrower and more class-specific (DNRT, Fig. of aggregated responses).
Writes ``responses.csv`` (run, class, channel, mean, std) and ``responses.png``.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from pydantic import PositiveInt

from bionets.configbase import PathText
from bionets.errors import BionetsError
from bionets.layers.arr import per_sample
from bionets.experiments import register_experiment
from bionets.mechanisms.arr import classifier_layer


def collect(checkpoint: str, data_root: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The test split's responses and labels, and what they are of ("MODEL on DATA")."""
    from bionets.engine.evaluate import model_from_checkpoint

    model, _, cfg, data = model_from_checkpoint(checkpoint, device=torch.device("cpu"), data_root=data_root,
                                              root_option="data_root=DIR")
    arr = cfg.mechanisms.get("arr")
    head = classifier_layer(model, arr and arr.classifier)   # the layer ARR's classifier hook reads (one line if none)
    feats, labels = [], []
    handle = head.register_forward_pre_hook(
        lambda m, args: feats.append((args[0].mean((2, 3)) if args[0].ndim == 4 else args[0]).detach().flatten(1)))
    model.eval()
    with torch.no_grad():
        for x, y in data.test:
            model(x)
            feats[-1] = per_sample(feats[-1], len(y))       # a spiking net's time steps averaged, as ARR does
            labels.append(y)
    handle.remove()
    return torch.cat(feats), torch.cat(labels), f"{cfg.model.name} on {cfg.data.name}"


def _run_name(checkpoint: str, taken: str | None = None) -> str:
    """A checkpoint's run directory name (``runs/NAME/best.pt``), with the file's stem where the
    other run has that name."""
    path = Path(checkpoint)
    name = path.parent.name or path.stem
    return f"{name}/{path.stem}" if name == taken else name


@register_experiment("responses")
def responses(out_dir: Path, *, checkpoint: PathText = "", compare: PathText = "", channels: PositiveInt = 8,
              classes: PositiveInt = 4, data_root: PathText | None = None) -> str:
    """Violin plots of a checkpoint's aggregated responses (the features ARR works on), per class
    and channel, beside those of a ``compare`` checkpoint (e.g. the same model without DNRT)."""
    if not checkpoint:
        raise BionetsError("experiment responses needs checkpoint=PATH (a run's best.pt); add compare=PATH for a second run")
    first = _run_name(checkpoint)
    runs = {first: collect(checkpoint, data_root)}
    if compare:
        runs[_run_name(compare, first)] = collect(compare, data_root)
    rows, spread = [], {}
    classes = min(classes, *(int(y.max()) + 1 for _, y, _ in runs.values()))   # those the data has
    for name, (r, y, _) in runs.items():
        spread[name] = float(torch.stack([r[y == k].std(0).mean() for k in y.unique()]).mean())
        for k in range(classes):
            for c in range(min(channels, r.shape[1])):
                v = r[y == k, c]
                rows.append({"run": name, "class": k, "channel": c, "mean": float(v.mean()), "std": float(v.std())})
    with (out_dir / "responses.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    what = sorted({w for _, _, w in runs.values()})
    _plot(runs, out_dir / "responses.png", channels, classes, f"{' vs '.join(what)}, the classifier's input")
    return "mean within-class std of the aggregated responses: " + ", ".join(f"{n} {s:.4f}" for n, s in spread.items())


def _plot(runs: dict, path: Path, channels: int, classes: int, what: str) -> None:
    from matplotlib.figure import Figure

    names = list(runs)
    # one y scale per class (column): the two runs' spreads compare by eye
    fig = Figure(figsize=(3 * classes, 2.6 * len(names) + 0.4), layout="constrained")
    axes = fig.subplots(len(names), classes, squeeze=False, sharey="col")
    for i, name in enumerate(names):
        r, y, _ = runs[name]
        for k in range(classes):
            ax = axes[i][k]
            data = [r[y == k, c].numpy() for c in range(min(channels, r.shape[1]))]
            if all(len(d) > 1 for d in data):
                ax.violinplot(data, positions=range(len(data)), showmeans=True)   # channels 0.., as in the CSV
            ax.set_title(f"{name}: class {k}", fontsize=8)
            ax.set_xlabel("channel", fontsize=7)
        axes[i][0].set_ylabel("response (bar: mean)", fontsize=7)
    fig.suptitle(f"Aggregated responses per class: {what}", fontsize=9)
    fig.savefig(path, dpi=110)
