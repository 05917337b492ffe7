"""``bionets experiment fewshot``: quadratic neurons vs a two-layer MLP with little training data.

Liu et al. (NeurIPS 2024), Fig. 2: one quadratic neuron per class, ``s_j(x) = x^T A_j x + w_j.x + b_j``,
prediction ``argmax_j s_j(x)``, trained with softmax cross-entropy, against a two-layer ReLU MLP,
as the fraction of the training set used shrinks. By default on sklearn's bundled 8x8 digits (a
fixed stratified 80/20 split of bionets.data), on MNIST or on image folders such as Arabic MNIST
(``DIR/train/<class>/``, ``DIR/val/<class>/``) with ``data_root=DIR``. Each (fraction, seed) draws its own
stratified subset (at least one image per class); both models see the same subset and are fitted by
full-batch L-BFGS with the same L2 penalty (see ``quadratic_fit``). The MLP's hidden width defaults
to the one giving it the quadratic model's parameter count, so neither wins by size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import NonNegativeFloat, PositiveInt

from bionets.configbase import PathText
from bionets.engine.files import make_output_dir
from bionets.experiments import Fraction, NonEmpty, register_experiment
from bionets.engine.distributed import parse_device
from bionets.experiments.quadratic_fit import (accuracy, band_plot, parameter_count, fit,
                                               load_images, matched_hidden, mean_spread, new_figure, quadratic_model,
                                               stratified_subset, subset_generator, two_layer_mlp, write_csv)
from bionets.progress import progress_bar

COLORS = {"quadratic": "tab:red", "mlp": "tab:blue"}
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@register_experiment("fewshot")
def fewshot(out_dir: Path, *, fractions: NonEmpty[Fraction] = FRACTIONS, seeds: PositiveInt = 3,
            data_root: PathText | None = None, rank: PositiveInt | None = None, hidden: PositiveInt | None = None,
            weight_decay: NonNegativeFloat = 1e-3, max_iter: PositiveInt = 200, device: str = "cpu") -> str:
    """Test accuracy of quadratic neurons (``rank``: full A if None) and a two-layer MLP (``hidden``
    units; default: parameter-matched) against the fraction of training data, ``seeds`` seeds each.

    Writes ``fewshot.csv`` (dataset, model, fraction, n_train, seed, test_acc, params) and
    ``fewshot.png`` (mean and +-1 sd band over seeds). MNIST with a full A has 6.1 M quadratic
    weights: use ``device=cuda`` or a low ``rank`` there.
    """
    fractions = sorted(set(fractions))
    dev = parse_device(device, "option device")
    data = load_images(data_root)
    x_train, y_train = data["x_train"].to(dev), data["y_train"].to(dev)
    x_test, y_test = data["x_test"].to(dev), data["y_test"].to(dev)
    d, k = x_train.shape[1], data["classes"]
    q_params = parameter_count(quadratic_model(d, k, rank))
    hidden = hidden or matched_hidden(d, k, q_params)
    builders = {"quadratic": lambda: quadratic_model(d, k, rank), "mlp": lambda: two_layer_mlp(d, hidden, k)}
    rows = []
    with progress_bar("fewshot (fits)", seeds * len(fractions) * len(builders)) as bar:
        for seed in range(seeds):
            for fraction in fractions:
                idx = stratified_subset(data["y_train"], fraction, subset_generator(seed, fraction)).to(dev)
                for name, build in builders.items():
                    torch.manual_seed(seed)
                    model = build().to(dev)
                    fit(model, x_train[idx], y_train[idx], weight_decay=weight_decay, max_iter=max_iter)
                    bar.update()
                    rows.append({"dataset": data["name"], "model": name, "fraction": fraction, "n_train": len(idx),
                                 "seed": seed, "test_acc": accuracy(model, x_test, y_test),
                                 "params": parameter_count(model)})
    out_dir = make_output_dir(out_dir)
    write_csv(out_dir / "fewshot.csv", rows)
    fig, (ax,) = new_figure(1, size=5)
    band_plot(ax, rows, "fraction", "model", "test_acc", COLORS)
    ax.set(xscale="log", xlabel="fraction of the training set", ylabel="test accuracy (fraction)")
    ax.set_title(f"{data['name']}: quadratic neurons vs two-layer MLP\n(mean +- sd over {seeds} seeds)", fontsize=10)
    ax.legend()
    fig.savefig(out_dir / "fewshot.png", dpi=120)
    stats = mean_spread(rows, ("model", "fraction"), "test_acc")
    lines = [f"fewshot on {data['name']} ({seeds} seeds; quadratic {q_params:,} params, MLP hidden {hidden}, "
             f"{rows[1]['params']:,} params): test accuracy mean+-sd"]
    for fraction in fractions:
        q, m = stats["quadratic", fraction], stats["mlp", fraction]
        lines.append(f"  fraction {fraction:g}: quadratic {q[0]:.3f}+-{q[1]:.3f}  mlp {m[0]:.3f}+-{m[1]:.3f}")
    return "\n".join(lines)
