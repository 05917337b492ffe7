"""``bionets experiment gaussian``: a quadratic neuron vs a two-layer MLP on two Gaussian classes.

Liu et al. (NeurIPS 2024), Fig. 1: for two Gaussian classes ``N(mu_0, Sigma_0)``, ``N(mu_1, Sigma_1)``
with equal priors, the Bayes rule compares the log-densities,

    g(x) = log p_1(x) - log p_0(x) = x^T M x + v.x + c,   M = (Sigma_0^-1 - Sigma_1^-1) / 2,
    v = Sigma_1^-1 mu_1 - Sigma_0^-1 mu_0,
    c = (mu_0^T Sigma_0^-1 mu_0 - mu_1^T Sigma_1^-1 mu_1 + log|Sigma_0| - log|Sigma_1|) / 2,

a quadratic discriminant, exactly the form of one quadratic neuron ``sigmoid(x^T A x + w.x + b)``.
With identical covariances M = 0 and the boundary is linear. The experiment trains the neuron and
an MLP on n samples for n over a geometric range (several seeds) and reports test accuracy against
the Bayes-optimal accuracy, plus the fraction of test points on which a model disagrees with the
Bayes rule (a distance to the optimal boundary).

Bayes-optimal accuracy (of the TRUE rule, not of a trained model): with identical covariances it is
``Phi(Delta / 2)``, Delta the Mahalanobis distance between the means (closed form). Otherwise it is
``(P(g < 0 | class 0) + P(g > 0 | class 1)) / 2``, where under class j, ``g`` is a quadratic form
in a standard normal vector z (``x = mu_j + L z``, ``L L^T = Sigma_j``); diagonalizing
``L^T M L = U diag(lambda) U^T`` gives ``g = sum_i lambda_i w_i^2 + b_i w_i + g(mu_j)``, w = U^T z,
whose characteristic function is
``phi(t) = exp(i t g(mu_j)) prod_i (1 - 2 i lambda_i t)^(-1/2) exp(-b_i^2 t^2 / (2 (1 - 2 i lambda_i t)))``,
and ``P(g < 0) = 1/2 - (1/pi) int_0^inf Im(phi(t)) / t dt`` (Gil-Pelaez inversion), a 1-D integral
evaluated numerically (scipy's QUADPACK, see ``_prob_negative``) to about 1e-9 in any dimension; it
matches the exact 1-D formula to 1e-10 and Monte Carlo with 10^6 samples within its error.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from matplotlib.lines import Line2D
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from scipy import integrate, stats

from bionets.configbase import Seed
from bionets.data.config import GaussianConfig
from bionets.data.gaussian import gaussian_classes, sample_gaussian
from bionets.engine.files import make_output_dir
from bionets.errors import BionetsError
from bionets.experiments import NonEmpty, register_experiment
from bionets.experiments.quadratic_fit import (accuracy, band_plot, fit, mean_spread, new_figure, predict,
                                               quadratic_model, subset_generator, two_layer_mlp, write_csv)
from bionets.progress import progress_bar

CASES = ("identical", "different")
SampleSize = Annotated[int, Field(ge=2)]
COLORS = {"quadratic": "tab:red", "mlp": "tab:blue"}


def log_density_ratio(means: np.ndarray, covs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(M, v, c)`` with ``log p_1(x) - log p_0(x) = x^T M x + v.x + c`` (equal priors)."""
    (mu0, mu1), (s0, s1) = means, covs
    p0, p1 = np.linalg.inv(s0), np.linalg.inv(s1)
    m = 0.5 * (p0 - p1)
    v = p1 @ mu1 - p0 @ mu0
    c = 0.5 * (mu0 @ p0 @ mu0 - mu1 @ p1 @ mu1 + np.linalg.slogdet(s0)[1] - np.linalg.slogdet(s1)[1])
    return m, v, float(c)


def _prob_negative(m: np.ndarray, v: np.ndarray, c: float, mu: np.ndarray, cov: np.ndarray) -> float:
    """``P(x^T M x + v.x + c < 0)`` for ``x ~ N(mu, cov)`` by Gil-Pelaez inversion (module docstring).

    ``|phi(t)|`` falls monotonically. Plain adaptive quadrature covers ``[0, t0]``, ``t0 = 1 / min
    |lambda_i|`` or, if sooner, where ``|phi| < 1e-14`` (then nothing is left beyond). Otherwise the
    tail, which decays only like ``t^(-1-d/2)`` (too slowly in 1-3 dims for plain quadrature), is
    ``exp(i omega t) h(t)`` with ``omega = g(mu) - sum_i b_i^2 / (4 lambda_i)`` (the constant of the
    completed square) and ``h`` slowly varying: QUADPACK's Fourier-integral rule (QAWF) takes it.
    """
    chol = np.linalg.cholesky(cov)
    lam, u = np.linalg.eigh(chol.T @ m @ chol)
    b = u.T @ (chol.T @ (2 * m @ mu + v))
    g_mu = mu @ m @ mu + v @ mu + c
    curved = np.abs(lam) > 1e-9 * np.abs(lam).max(initial=0.0)

    def phi(t: float) -> complex:
        z = 1 - 2j * lam * t
        return np.exp(1j * t * g_mu + np.sum(-0.5 * np.log(z) - b ** 2 * t ** 2 / (2 * z)))

    t0 = 1.0 / np.abs(lam[curved]).min() if curved.any() else np.inf
    t_end = 1e-3
    while t_end < t0 and abs(phi(t_end)) >= 1e-14:
        t_end *= 2
    head = integrate.quad(lambda t: phi(t).imag / t, 0, min(t_end, t0), limit=2000, epsabs=1e-10, epsrel=1e-10)[0]
    if t_end < t0:
        return 0.5 - head / math.pi
    omega = g_mu - np.sum(b[curved] ** 2 / (4 * lam[curved]))

    def h(t: float) -> complex:
        return phi(t) * np.exp(-1j * omega * t) / t

    # Im(exp(i omega t) h) = sin(omega t) Re h + cos(omega t) Im h
    tail = (integrate.quad(lambda t: h(t).real, t0, np.inf, weight="sin", wvar=omega, limlst=200)[0]
            + integrate.quad(lambda t: h(t).imag, t0, np.inf, weight="cos", wvar=omega, limlst=200)[0])
    return 0.5 - (head + tail) / math.pi


def bayes_accuracy(means, covs) -> float:
    """Accuracy of the Bayes-optimal rule for two equally likely Gaussian classes.

    ``Phi(Delta/2)`` in closed form when the covariances are identical, else the exact Gil-Pelaez
    integral (module docstring).
    """
    means, covs = np.asarray(means, np.float64), np.asarray(covs, np.float64)
    if means.shape[0] != 2:
        raise BionetsError(f"bayes_accuracy needs 2 classes, got {means.shape[0]}")
    if np.array_equal(covs[0], covs[1]):
        diff = means[1] - means[0]
        return float(stats.norm.cdf(0.5 * math.sqrt(diff @ np.linalg.solve(covs[0], diff))))
    m, v, c = log_density_ratio(means, covs)
    return 0.5 * _prob_negative(m, v, c, means[0], covs[0]) + 0.5 * (1 - _prob_negative(m, v, c, means[1], covs[1]))


def bayes_decision(means: torch.Tensor, covs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The Bayes rule's class (``g(x) > 0``) for every row of ``x``."""
    return (_log_ratio(means, covs, x) > 0).long()


def _log_ratio(means: torch.Tensor, covs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ratio = log_density_ratio(means.double().numpy(), covs.double().numpy())
    m, v, c = (torch.as_tensor(a, dtype=x.dtype) for a in ratio)
    return torch.einsum("ni,ij,nj->n", x, m, x) + x @ v + c


def sample_sizes(n_min: int, n_max: int, points: int) -> list[int]:
    if not 2 <= n_min <= n_max or points < 1:
        raise BionetsError(f"need 2 <= n_min <= n_max and points >= 1, got n_min={n_min}, n_max={n_max}, "
                           f"points={points}")
    return sorted({round(v) for v in np.geomspace(n_min, n_max, points)})


def samples_to_reach(rows: list[dict], target: float) -> int | None:
    """The smallest n from which the mean test accuracy stays >= ``target`` (None if never)."""
    stats_ = sorted((n, m) for (n,), (m, _) in mean_spread(rows, ("n",), "test_acc").items())
    reached = None
    for n, m in reversed(stats_):
        if m < target:
            break
        reached = n
    return reached


def _models(dim: int, hidden: int):
    return {"quadratic": lambda: quadratic_model(dim, 1), "mlp": lambda: two_layer_mlp(dim, hidden, 1)}


def _plot_accuracy(path: Path, rows: list[dict], bayes: dict[str, float]) -> None:
    fig, axes = new_figure(len(bayes), 2)
    for col, case in enumerate(bayes):
        case_rows = [r for r in rows if r["case"] == case]
        top, bottom = axes[col], axes[len(bayes) + col]
        band_plot(top, case_rows, "n", "model", "test_acc", COLORS)
        top.axhline(bayes[case], color="k", ls="--", lw=1, label=f"Bayes {bayes[case]:.3f}")
        top.set(title=f"{case} covariances", xscale="log", xlabel="training samples n", ylabel="test accuracy")
        top.legend()
        band_plot(bottom, case_rows, "n", "model", "bayes_disagreement", COLORS)
        bottom.set(xscale="log", yscale="log", xlabel="training samples n", ylabel="disagreement with the Bayes rule")
    fig.savefig(path, dpi=120)


def _plot_boundaries(path: Path, fitted: dict, problems: dict, train_sets: dict, ns: list[int]) -> None:
    fig, axes = new_figure(len(ns), len(problems), size=3.2)
    for row, (case, (means, covs)) in enumerate(problems.items()):
        for col, n in enumerate(ns):
            ax = axes[row * len(ns) + col]
            x, y = train_sets[case, n]
            lo = (means - 3 * covs.diagonal(dim1=1, dim2=2).sqrt()).min(0).values.numpy()
            hi = (means + 3 * covs.diagonal(dim1=1, dim2=2).sqrt()).max(0).values.numpy()
            g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
            grid = torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], 1))
            bayes = _log_ratio(means, covs, grid).reshape(g0.shape).numpy()
            ax.contour(g0, g1, bayes, levels=[0], colors="k", linestyles="--")
            for name, color in COLORS.items():
                with torch.no_grad():
                    z = fitted[case, name, n](grid)[:, 0].reshape(g0.shape).numpy()
                ax.contour(g0, g1, z, levels=[0], colors=color)
            for label, color in ((0, "tab:green"), (1, "tab:orange")):
                ax.scatter(x[y == label, 0], x[y == label, 1], color=color, s=6, label=f"class {label}")
            ax.set(title=f"{case}, n={n}", xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="$x_1$", ylabel="$x_2$")
            ax.tick_params(labelsize=6)
    handles, _ = axes[0].get_legend_handles_labels()
    lines = [Line2D([], [], color="k", ls="--")] + [Line2D([], [], color=c) for c in COLORS.values()]
    fig.legend(lines + handles, ["Bayes"] + [f"{name} boundary" for name in COLORS] + ["class 0", "class 1"],
               loc="outside lower center", ncols=len(COLORS) + 3, fontsize=7)
    fig.suptitle("Decision boundaries on two Gaussian classes in 2-D (seed 0; points: the training set)", fontsize=9)
    fig.savefig(path, dpi=120)


@register_experiment("gaussian")
def gaussian(out_dir: Path, *, dim: PositiveInt = 2, cases: NonEmpty[Literal["identical", "different"]] = CASES,
             n_min: SampleSize = 8, n_max: SampleSize = 2048, points: PositiveInt = 9, seeds: PositiveInt = 5,
             hidden: PositiveInt = 32, weight_decay: NonNegativeFloat = 1e-3, max_iter: PositiveInt = 300,
             n_test: PositiveInt = 20000, separation: PositiveFloat = 2.0, data_seed: Seed = 0,
             boundary_n: list[SampleSize] | None = None) -> str:
    """Quadratic neuron vs two-layer MLP (``hidden`` ReLU units) on two Gaussian classes in ``dim`` dims.

    For each case in ``cases`` (identical / different covariances, drawn by
    ``bionets.data.gaussian.gaussian_classes`` from ``data_seed`` and ``separation``), both models are
    fitted on n samples (``points`` sizes from ``n_min`` to ``n_max``, geometric) for seeds
    0..``seeds``-1 (training sample and initialization) and scored on ``n_test`` fresh samples.
    Writes ``gaussian.csv`` (case, model, n, seed, test_acc, bayes_acc, bayes_disagreement),
    ``gaussian_accuracy.png`` and, for ``dim=2``, ``gaussian_boundaries.png`` (seed 0 at the sizes
    ``boundary_n``, default the smallest, a middle and the largest n).
    """
    ns = sample_sizes(n_min, n_max, points)
    outside = [n for n in boundary_n or [] if not n_min <= n <= n_max]
    if outside:     # (they were trained for every seed, and the curve ran past n_max)
        raise BionetsError(f"boundary_n {outside} lies outside n_min={n_min} .. n_max={n_max}: give sizes in that range")
    cases = list(dict.fromkeys(cases))      # a case given twice counted twice in the spread over seeds
    boundary_n = sorted(set(boundary_n or [ns[0], ns[len(ns) // 2], ns[-1]]))
    ns = sorted(set(ns) | set(boundary_n))
    torch_dtype = torch.float64
    rows, bayes, problems, fitted, train_sets = [], {}, {}, {}, {}
    models = _models(dim, hidden)
    with progress_bar("gaussian (fits)", len(cases) * seeds * len(ns) * len(models)) as bar:
        for case in cases:
            means, covs = gaussian_classes(GaussianConfig(dim=dim, num_classes=2, kind=case, separation=separation,
                                                          seed=data_seed))
            means, covs = means.to(torch_dtype), covs.to(torch_dtype)
            problems[case] = (means, covs)
            bayes[case] = bayes_accuracy(means.numpy(), covs.numpy())
            x_test, y_test = sample_gaussian(means, covs, n_test, torch.Generator().manual_seed(10**6 + data_seed))
            x_test = x_test.to(torch_dtype)
            bayes_test = bayes_decision(means, covs, x_test)
            for seed in range(seeds):
                for n in ns:
                    x, y = sample_gaussian(means, covs, n, subset_generator(seed, n))
                    x = x.to(torch_dtype)
                    for name, build in models.items():
                        torch.manual_seed(seed)
                        model = build().to(torch_dtype)
                        fit(model, x, y, weight_decay=weight_decay, max_iter=max_iter)
                        bar.update()
                        rows.append({"case": case, "model": name, "n": n, "seed": seed,
                                     "test_acc": accuracy(model, x_test, y_test), "bayes_acc": bayes[case],
                                     "bayes_disagreement": (predict(model, x_test) != bayes_test).double().mean().item()})
                        if seed == 0 and n in boundary_n:
                            fitted[case, name, n], train_sets[case, n] = model.eval(), (x, y)
    out_dir = make_output_dir(out_dir)
    write_csv(out_dir / "gaussian.csv", rows)
    _plot_accuracy(out_dir / "gaussian_accuracy.png", rows, bayes)
    if dim == 2:
        _plot_boundaries(out_dir / "gaussian_boundaries.png", fitted, problems, train_sets, boundary_n)
    else:       # (an earlier 2-D run's figure in this directory would pass for this run's)
        (out_dir / "gaussian_boundaries.png").unlink(missing_ok=True)
    return _summary(rows, bayes, dim, seeds)


def _summary(rows: list[dict], bayes: dict[str, float], dim: int, seeds: int) -> str:
    lines = [f"gaussian: d={dim}, {seeds} seed{'s' if seeds != 1 else ''}; n from which the mean test accuracy stays "
             "within 2 points of Bayes"]
    for case, best in bayes.items():
        parts = []
        for name in COLORS:
            sel = [r for r in rows if r["case"] == case and r["model"] == name]
            reach = samples_to_reach(sel, best - 0.02)
            n_last = max(r["n"] for r in sel)
            m, s = mean_spread([r for r in sel if r["n"] == n_last], ("n",), "test_acc")[n_last,]
            within = f"n>={reach}" if reach else f"not within 2 points up to n={n_last}"
            spread = f"+-{s:.3f}" if seeds > 1 else ""
            parts.append(f"{name} {within} (acc at n={n_last}: {m:.3f}{spread})")
        lines.append(f"  {case} covariances: Bayes {best:.3f}; " + "; ".join(parts))
    return "\n".join(lines)
