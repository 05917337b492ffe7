"""Shared pieces of the Dit theory experiments (``gaussian``, ``fewshot``, ``eigen``).

The two models compared (Liu et al., NeurIPS 2024, "Dendritic Integration Inspired Artificial Neural
Networks"): quadratic neurons ``y = w.x + x^T A x + b`` (one per output) and a two-layer ReLU MLP.
Both are fitted the same way: full-batch L-BFGS (strong Wolfe line search) on the mean logistic /
cross-entropy loss plus an L2 penalty ``weight_decay / 2 * ||theta||^2`` on every weight tensor
(biases excluded). Full-batch fitting makes each run deterministic given its seed, with no learning
rate or epoch count to tune per model; the penalty keeps the minimum finite on separable data.
Figures use matplotlib's object API (``Figure``), so no pyplot backend is touched.
"""
from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F

from bionets.errors import BionetsError
from bionets.layers.quadratic import QuadraticNeuron


def subset_generator(seed: int, value: float) -> torch.Generator:
    """The random stream of one seed's draw at one option value (a sample size, a fraction): the
    same whatever other values the option lists (a stream by the value's position in the list
    moved every later point when a value was added)."""
    entropy = [seed, round(value * 10**9)]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))


def quadratic_model(in_features: int, out_features: int, rank: int | None = None) -> QuadraticNeuron:
    """``out_features`` quadratic neurons ``y_o = w_o.x + x^T A_o x + b_o`` (A full or of rank ``rank``)."""
    return QuadraticNeuron(in_features, out_features, rank=rank)


def two_layer_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """``Linear(in, hidden) -> ReLU -> Linear(hidden, out)``."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_hidden(in_features: int, out_features: int, params: int) -> int:
    """The MLP hidden width whose parameter count is nearest ``params`` (at least 1)."""
    return max(1, round((params - out_features) / (in_features + 1 + out_features)))


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:  # one output: sigmoid unit, logistic loss
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))
    return F.cross_entropy(logits, y)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float, max_iter: int,
        on_evaluation: Callable[[], object] | None = None) -> float:
    """Minimize ``mean loss + weight_decay/2 * sum ||W||^2`` over the full batch with L-BFGS.

    Returns the final objective. ``y`` holds class indices (0/1 for a one-output model).
    ``on_evaluation`` is called at each of the objective's evaluations (L-BFGS stops after the
    iteration that reaches ``max_evaluations(max_iter)`` of them; its line search may add a few).
    """
    weights = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        return _loss(model(x), y) + 0.5 * weight_decay * sum(w.pow(2).sum() for w in weights)

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        if on_evaluation is not None:
            on_evaluation()
        return loss

    model.train()
    opt.step(closure)
    with torch.no_grad():
        return float(objective())


def max_evaluations(max_iter: int) -> int:
    """L-BFGS's default cap on the objective's evaluations in one ``step`` (its ``max_eval``)."""
    return max_iter * 5 // 4


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Class predictions: ``logit > 0`` for a one-output model, argmax otherwise."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y).double().mean().item()


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_spread(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, tuple[float, float]]:
    """``{key values: (mean, standard deviation over the rows sharing them)}``; sd is 0 for one row."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r[value])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}


def band_plot(ax, rows: list[dict], x: str, model_key: str, value: str, colors: dict[str, str]) -> None:
    """Mean of ``value`` against ``x`` per model, with a +-1 sd band over seeds."""
    stats = mean_spread(rows, (model_key, x), value)
    for model, color in colors.items():
        pts = sorted((k[1], m, s) for k, (m, s) in stats.items() if k[0] == model)
        if not pts:
            continue
        xs, ms, ss = zip(*pts)
        ax.plot(xs, ms, "o-", color=color, label=model, ms=3)
        ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=color, alpha=0.2)


def new_figure(ncols: int, nrows: int = 1, size: float = 4.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(size * ncols, size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def load_images(data_root: str | None) -> dict:
    """Flattened images in [0, 1]: sklearn's bundled 8x8 digits (bionets.data's fixed stratified
    80/20 split) when ``data_root`` is None; else under ``data_root`` grayscale image folders
    ``train/<class>/`` and ``val/<class>/`` where it has them (Arabic MNIST, say; named after the
    folder), or MNIST's own train/test split (torchvision's files).

    Returns ``{"name", "x_train", "y_train", "x_test", "y_test", "side", "classes"}``.
    """
    from bionets.data.imagefolder import load_gray_folders
    from bionets.data.sources import data_options, load_digits_split, load_mnist

    if data_root is None:
        name, (x, y, xt, yt, classes) = "digits", load_digits_split()
    elif (Path(data_root).expanduser() / "train").is_dir():
        name, (x, y, xt, yt, classes) = Path(data_root).expanduser().resolve().name, load_gray_folders(str(data_root))
    else:
        with data_options("data_root=DIR (MNIST's files, or grayscale image folders DIR/train and DIR/val)", None):
            name, (x, y, xt, yt, classes) = "mnist", load_mnist(str(data_root), False)

    def flat(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).float() / (255.0 if images.dtype == torch.uint8 else 1.0)

    return {"name": name, "x_train": flat(x), "y_train": y, "x_test": flat(xt), "y_test": yt,
            "side": x.shape[-1], "classes": len(classes)}


def stratified_subset(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a random ``fraction`` of each class of ``y`` (at least one sample per class)."""
    if not 0 < fraction <= 1:
        raise BionetsError(f"a training fraction must lie in (0, 1], got {fraction}")
    picked = []
    for c in y.unique():
        idx = (y == c).nonzero()[:, 0]
        take = max(1, round(fraction * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:take]])
    return torch.cat(picked).sort().values
