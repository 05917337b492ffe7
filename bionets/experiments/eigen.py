"""``bionets experiment eigen``: do the learned quadratic weights A_j mirror the class covariances?

Liu et al. (NeurIPS 2024), Fig. 5: for each digit class j, the leading eigenvectors of the class
covariance ``Sigma_j`` and of the learned quadratic weight ``A_j`` look alike. Here one quadratic
neuron per class, ``s_j(x) = x^T A_j x + w_j.x + b_j``, is trained jointly with softmax
cross-entropy (the ``fewshot`` model; multi-class rather than one-vs-rest because the softmax ties
the A_j together: its L2-penalized optimum has ``sum_j A_j = 0``, so each A_j is the class's
deviation from the others, as in the Gaussian optimum ``A_j = -Sigma_j^-1 / 2 + common``).

Only the symmetric part ``(A_j + A_j^T) / 2`` enters ``x^T A_j x``; its eigenvectors are ordered by
eigenvalue, largest (most positive) first: the directions along which a larger input raises the
class's score. Sigma_j's eigenvectors are ordered by variance, largest first. Eigenvector signs are
arbitrary, so similarities are ``|cos|``. Since ``E[x^T A x] = mu^T A mu + tr(A Sigma)``, A_j
answers to the class mean as well as to its covariance: on the digits A_j's first eigenvector lies
along the class mean mu_j (|cos| ~0.8, column ``a_mean_abs_cos``) and Sigma_j's leading
eigenvectors reappear among A_j's next ones. So besides the k-th-with-k-th pairing the CSV gives,
for Sigma_j's k-th eigenvector, the best |cos| with any of A_j's ``top_k`` and that eigenvector's
rank, and the chance levels of both for random unit vectors in d dimensions. The figure shows
Sigma_j's eigenvectors beside their best matches.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from bionets.configbase import PathText, Seed
from bionets.engine.files import make_output_dir
from bionets.errors import BionetsError
from bionets.experiments import Fraction, register_experiment
from bionets.engine.distributed import parse_device
from bionets.experiments.quadratic_fit import (accuracy, fit, load_images, max_evaluations, new_figure,
                                               quadratic_model, stratified_subset, write_csv)
from bionets.progress import progress_bar


def leading_eigenvectors(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues of the symmetric part of ``matrix`` and their eigenvectors (columns)."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T).double())
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def chance_abs_cos(d: int) -> float:
    """``E|cos|`` between two independent uniformly random unit vectors in ``d`` dimensions."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def chance_best_abs_cos(d: int, k: int, draws: int = 2000, seed: int = 0) -> float:
    """``E max_i |cos(u, v_i)|`` for a random unit u and k random orthonormal v_i (Monte Carlo)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(draws, d, generator=g, dtype=torch.float64), dim=1)
    v = torch.linalg.qr(torch.randn(draws, d, k, generator=g, dtype=torch.float64)).Q
    return torch.einsum("nd,ndk->nk", u, v).abs().max(1).values.mean().item()


def _image(vec: torch.Tensor, side: int) -> np.ndarray:
    return vec.reshape(side, side).numpy()


# eigenvectors shown a class: the figure draws 2 x show panels a class (show=64 took 10 minutes to draw)
Shown = Annotated[int, Field(ge=1, le=10)]


@register_experiment("eigen")
def eigen(out_dir: Path, *, top_k: PositiveInt = 5, show: Shown = 3, fraction: Fraction = 1.0,
          data_root: PathText | None = None, weight_decay: NonNegativeFloat = 1e-3, max_iter: PositiveInt = 300,
          seed: Seed = 0, device: str = "cpu") -> str:
    """Eigenvectors of class covariances vs learned quadratic weights, per class.

    Trains quadratic neurons (full A, one per class) on ``fraction`` of the training set (digits, or
    MNIST or grayscale image folders under ``data_root``), then writes ``eigen.csv`` (class, k, sigma_eigenvalue, a_eigenvalue,
    abs_cos, best_abs_cos, best_rank, a_mean_abs_cos, chance_abs_cos, chance_best_abs_cos),
    ``eigen_vectors.png`` (per class Sigma_j's ``show`` leading eigenvectors, each beside its best
    match among A_j's top ``top_k``, signed alike) and ``eigen_cosine.png`` (|cos| of the leading
    pair and of Sigma_j's leading eigenvector's best match per class, with chance levels).
    """
    dev = parse_device(device, "option device")
    data = load_images(data_root)
    idx = stratified_subset(data["y_train"], fraction, torch.Generator().manual_seed(seed))
    x, y = data["x_train"][idx], data["y_train"][idx]
    fewest = int(torch.bincount(y, minlength=data["classes"]).min())
    if fewest < 2:
        raise BionetsError(f"eigen needs >= 2 training images per class for a class covariance; fraction={fraction} "
                           f"leaves {fewest}: raise fraction")
    d, classes, side = x.shape[1], data["classes"], data["side"]
    torch.manual_seed(seed)
    model = quadratic_model(d, classes).to(dev)
    with progress_bar("eigen (L-BFGS evaluations)", max_evaluations(max_iter)) as bar:
        fit(model, x.to(dev), y.to(dev), weight_decay=weight_decay, max_iter=max_iter, on_evaluation=bar.update)
    test_acc = accuracy(model, data["x_test"].to(dev), data["y_test"].to(dev))
    a = model.A.detach().double().cpu()
    top_k = min(top_k, d)
    chance, chance_best = chance_abs_cos(d), chance_best_abs_cos(d, top_k, seed=seed)
    rows, pairs = [], {}
    for j in range(classes):
        sigma = torch.cov(x[y == j].double().T)
        s_val, s_vec = leading_eigenvectors(sigma, top_k)
        a_val, a_vec = leading_eigenvectors(a[j], top_k)
        dots = s_vec.T @ a_vec  # [k of Sigma, k of A]
        best = dots.abs().argmax(1)
        matched = a_vec[:, best] * torch.sign(dots.gather(1, best[:, None]))[:, 0]  # signed like Sigma's
        pairs[j] = (s_vec, matched, best + 1)
        mean_dir = torch.nn.functional.normalize(x[y == j].double().mean(0), dim=0)
        for k in range(top_k):
            rows.append({"class": j, "k": k + 1, "sigma_eigenvalue": s_val[k].item(), "a_eigenvalue": a_val[k].item(),
                         "abs_cos": dots[k, k].abs().item(), "best_abs_cos": dots[k].abs().max().item(),
                         "best_rank": best[k].item() + 1, "a_mean_abs_cos": (a_vec[:, k] @ mean_dir).abs().item(),
                         "chance_abs_cos": chance, "chance_best_abs_cos": chance_best})
    out_dir = make_output_dir(out_dir)
    write_csv(out_dir / "eigen.csv", rows)
    _plot_vectors(out_dir / "eigen_vectors.png", pairs, min(show, top_k), side)
    _plot_cosines(out_dir / "eigen_cosine.png", rows, chance, chance_best, top_k)
    lead = [r for r in rows if r["k"] == 1]
    mean_cos = sum(r["abs_cos"] for r in lead) / len(lead)
    mean_best = sum(r["best_abs_cos"] for r in lead) / len(lead)
    mean_dir = sum(r["a_mean_abs_cos"] for r in lead) / len(lead)
    per_class = " ".join(f"{r['class']}:{r['best_abs_cos']:.2f}(v{r['best_rank']})" for r in lead)
    return (f"eigen on {data['name']} ({len(idx)} training images, quadratic neurons' test accuracy {test_acc:.3f})\n"
            f"  Sigma_j's leading eigenvector vs A_j's: mean |cos| {mean_cos:.3f} (chance {chance:.3f}); "
            f"vs its best match among A_j's top {top_k}: {mean_best:.3f} (chance {chance_best:.3f})\n"
            f"  A_j's leading eigenvector vs the class mean: mean |cos| {mean_dir:.3f}\n"
            f"  best match per class (A's eigenvector rank): {per_class}")


def _plot_vectors(path: Path, pairs: dict, show: int, side: int) -> None:
    fig, axes = new_figure(2 * show, len(pairs), size=1.1)
    for row, (j, (s_vec, matched, rank)) in enumerate(pairs.items()):
        for k in range(show):
            for col, (vec, label) in enumerate(((s_vec[:, k], f"Sigma v{k + 1}"), (matched[:, k], f"A v{rank[k]}"))):
                ax = axes[row * 2 * show + 2 * k + col]
                lim = vec.abs().max().item()
                ax.imshow(_image(vec, side), cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set(xticks=[], yticks=[])
                ax.set_xlabel(label, fontsize=6, labelpad=1)
                if k == 0 and col == 0:
                    ax.set_ylabel(f"class {j}", fontsize=7)
    fig.savefig(path, dpi=120)


def _plot_cosines(path: Path, rows: list[dict], chance: float, chance_best: float, top_k: int) -> None:
    lead = [r for r in rows if r["k"] == 1]
    fig, (ax,) = new_figure(1, size=5)
    pos = np.arange(len(lead))
    ax.bar(pos - 0.2, [r["abs_cos"] for r in lead], 0.4, label="leading pair |cos|", color="tab:red")
    ax.bar(pos + 0.2, [r["best_abs_cos"] for r in lead], 0.4, label=f"best match in A's top {top_k}",
           color="tab:orange")
    ax.axhline(chance, color="k", ls="--", lw=1, label="chance, one pair")
    ax.axhline(chance_best, color="k", ls=":", lw=1, label=f"chance, best of {top_k}")
    ax.set(xticks=pos, xticklabels=[str(r["class"]) for r in lead], xlabel="class", ylabel="|cos|", ylim=(0, 1.3),
           yticks=np.linspace(0, 1, 6), title="leading eigenvector of Sigma_j vs A_j")
    ax.legend(fontsize=7, ncols=2, loc="upper center")       # above the bars (|cos| <= 1), none hidden
    fig.savefig(path, dpi=120)
