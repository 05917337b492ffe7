"""Dit theory experiments (gaussian, fewshot, eigen), end to end on tiny settings (the Dit benchmark:
test_benchmarks.py)."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from bionets.errors import BionetsError
from bionets.experiments.eigen import chance_abs_cos, eigen
from bionets.experiments.fewshot import fewshot
from bionets.experiments.gaussian import bayes_accuracy, gaussian, log_density_ratio

@pytest.fixture(autouse=True)
def one_thread():
    """Full-batch fits of a few thousand parameters gain nothing from threads (and lose much when
    other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def monte_carlo_bayes(means, covs, n=10**6, seed=0) -> float:
    """Accuracy of the true rule g(x) = log p1(x) - log p0(x) > 0 on n samples per class."""
    rng = np.random.default_rng(seed)
    m, v, c = log_density_ratio(means, covs)
    acc = 0.0
    for label in (0, 1):
        x = rng.multivariate_normal(means[label], covs[label], n)
        g = np.einsum("ni,ij,nj->n", x, m, x) + x @ v + c
        acc += 0.5 * np.mean((g > 0) == bool(label))
    return acc


def random_problem(d: int, identical: bool, seed: int):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(2, d)) * 0.7
    covs = []
    for _ in range(2):
        b = rng.normal(size=(d, d))
        covs.append(b @ b.T / d + 0.2 * np.eye(d))
    if identical:
        covs[1] = covs[0]
    return means, np.stack(covs)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_bayes_accuracy_matches_monte_carlo(d):
    for identical in (True, False):
        means, covs = random_problem(d, identical, seed=d)
        exact = bayes_accuracy(means, covs)
        mc = monte_carlo_bayes(means, covs)
        se = math.sqrt(exact * (1 - exact) / 2e6)
        assert abs(exact - mc) < 5 * se + 1e-6, (d, identical, exact, mc)


def test_bayes_accuracy_closed_forms():
    # identical covariances: Phi(Delta/2), and the general integral gives the same number
    means, covs = random_problem(3, identical=True, seed=0)
    diff = means[1] - means[0]
    delta = math.sqrt(diff @ np.linalg.solve(covs[0], diff))
    assert bayes_accuracy(means, covs) == pytest.approx(stats.norm.cdf(delta / 2), abs=1e-12)
    nudged = covs.copy()
    nudged[1] = nudged[1] * (1 + 1e-12)  # not bit-identical: takes the Gil-Pelaez path
    assert bayes_accuracy(means, nudged) == pytest.approx(stats.norm.cdf(delta / 2), abs=1e-7)
    # 1-D, different variances: the rule's two roots give the exact answer through normal CDFs
    means, covs = np.array([[0.0], [1.0]]), np.array([[[1.0]], [[2.5]]])
    m, v, c = log_density_ratio(means, covs)
    lo, hi = np.sort(np.roots([m[0, 0], v[0], c]).real)
    inside = [stats.norm.cdf((hi - means[k, 0]) / math.sqrt(covs[k, 0, 0]))
              - stats.norm.cdf((lo - means[k, 0]) / math.sqrt(covs[k, 0, 0])) for k in (0, 1)]
    # m > 0 here: g < 0 (class 0) between the roots
    assert m[0, 0] > 0
    assert bayes_accuracy(means, covs) == pytest.approx(0.5 * inside[0] + 0.5 * (1 - inside[1]), abs=1e-9)


def test_gaussian_quadratic_neuron_reaches_bayes_with_fewer_samples(tmp_path):
    summary = gaussian(tmp_path, cases=["different"], n_min=16, n_max=256, points=5, seeds=3, n_test=8000)
    rows = read_csv(tmp_path / "gaussian.csv")
    assert {r["case"] for r in rows} == {"different"} and len(rows) == 5 * 3 * 2
    assert (tmp_path / "gaussian_accuracy.png").stat().st_size > 0
    assert (tmp_path / "gaussian_boundaries.png").stat().st_size > 0
    bayes = float(rows[0]["bayes_acc"])

    def mean_acc(model, n):
        accs = [float(r["test_acc"]) for r in rows if r["model"] == model and int(r["n"]) == n]
        return sum(accs) / len(accs)

    sizes = sorted({int(r["n"]) for r in rows})
    assert all(mean_acc(m, n) <= bayes + 0.01 for m in ("quadratic", "mlp") for n in sizes)
    # the smallest n at which the quadratic neuron is within 2 points of Bayes: the MLP is not there yet
    n_q = min(n for n in sizes if mean_acc("quadratic", n) >= bayes - 0.02)
    assert mean_acc("mlp", n_q) < bayes - 0.02, (n_q, mean_acc("mlp", n_q), bayes)
    assert "quadratic" in summary and "Bayes" in summary
    # a size's samples are the same whatever other sizes are listed (they were drawn by position)
    gaussian(tmp_path / "one", cases=["different"], n_min=64, n_max=64, points=1, seeds=3, n_test=8000)
    assert read_csv(tmp_path / "one" / "gaussian.csv") == [r for r in rows if r["n"] == "64"]


def test_fewshot_end_to_end(tmp_path):
    summary = fewshot(tmp_path, fractions=[0.1, 1.0], seeds=2, max_iter=40)
    rows = read_csv(tmp_path / "fewshot.csv")
    assert len(rows) == 2 * 2 * 2 and (tmp_path / "fewshot.png").stat().st_size > 0
    params = {r["model"]: int(r["params"]) for r in rows}
    assert params["quadratic"] == 10 * 64 * 64 + 10 * 64 + 10
    assert abs(params["mlp"] - params["quadratic"]) < 0.01 * params["quadratic"]   # parameter-matched
    for r in rows:
        acc = float(r["test_acc"])
        assert 0.0 <= acc <= 1.0
        if float(r["fraction"]) == 1.0:
            assert acc > 0.9, r
    small = [int(r["n_train"]) for r in rows if float(r["fraction"]) == 0.1]
    assert all(140 <= n <= 148 for n in small)   # a stratified tenth of 1,437 images
    assert "fraction 0.1" in summary
    # a point is the same whatever other fractions are listed (its subset was drawn by its position)
    fewshot(tmp_path / "one", fractions=[0.1], seeds=2, max_iter=40)
    same = [r for r in rows if float(r["fraction"]) == 0.1]
    assert read_csv(tmp_path / "one" / "fewshot.csv") == same


def test_eigen_end_to_end(tmp_path):
    summary = eigen(tmp_path, top_k=3, show=2, max_iter=60)
    rows = read_csv(tmp_path / "eigen.csv")
    assert len(rows) == 10 * 3
    assert (tmp_path / "eigen_vectors.png").stat().st_size > 0 and (tmp_path / "eigen_cosine.png").stat().st_size > 0
    for r in rows:
        assert 0.0 <= float(r["abs_cos"]) <= float(r["best_abs_cos"]) + 1e-12 <= 1.0 + 1e-9
        assert 1 <= int(r["best_rank"]) <= 3
    lead = [r for r in rows if r["k"] == "1"]
    chance_best = float(lead[0]["chance_best_abs_cos"])
    assert float(lead[0]["chance_abs_cos"]) == pytest.approx(chance_abs_cos(64))
    # Sigma_j's leading eigenvector has a close partner among A_j's top eigenvectors, far above chance
    assert sum(float(r["best_abs_cos"]) for r in lead) / 10 > 2 * chance_best
    assert "class mean" in summary


def write_fake_mnist(root: Path, n_train: int, n_test: int) -> None:
    """Random 28x28 digits in MNIST's own idx files (torchvision's reader, the real code path)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[np.arange(n), 2 + labels * 2, 4:24] = 255      # a class-dependent bar: learnable
        header = np.array([2051, n, 28, 28], ">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + labels.tobytes())


def test_fewshot_and_eigen_on_mnist_files(tmp_path):
    write_fake_mnist(tmp_path / "data", 300, 100)
    fewshot(tmp_path / "f", fractions=[1.0], seeds=1, data_root=str(tmp_path / "data"), rank=2, hidden=16, max_iter=30)
    rows = read_csv(tmp_path / "f" / "fewshot.csv")
    assert {r["dataset"] for r in rows} == {"mnist"} and {int(r["n_train"]) for r in rows} == {300}
    assert all(float(r["test_acc"]) > 0.5 for r in rows)
    eigen(tmp_path / "e", top_k=2, show=1, data_root=str(tmp_path / "data"), max_iter=5)
    rows = read_csv(tmp_path / "e" / "eigen.csv")
    assert len(rows) == 10 * 2 and float(rows[0]["chance_abs_cos"]) == pytest.approx(chance_abs_cos(784))


def write_gray_folders(root, per_class, size=12, odd=False):
    """train/ and val/ class folders of grayscale PNGs with a class-dependent bar (learnable)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 100, (size, size), dtype=np.uint8)
                image[2 + 3 * c, 2:10] = 255
                side = size + 1 if odd and i == 0 else size
                Image.fromarray(image).resize((side, size)).save(root / split / f"c{c}" / f"{i}.png")


def test_fewshot_and_eigen_on_image_folders(tmp_path):
    """data_root with train/<class>/ and val/<class>/ (Arabic MNIST exported as images, say): read as
    grayscale through the imagefolder code path, named after the folder; other sizes are one line."""
    write_gray_folders(tmp_path / "arabic", 20)
    fewshot(tmp_path / "f", fractions=[1.0], seeds=1, data_root=str(tmp_path / "arabic"), rank=2, hidden=8, max_iter=30)
    rows = read_csv(tmp_path / "f" / "fewshot.csv")
    assert {r["dataset"] for r in rows} == {"arabic"} and {int(r["n_train"]) for r in rows} == {60}
    assert all(float(r["test_acc"]) > 0.6 for r in rows)
    eigen(tmp_path / "e", top_k=2, show=1, data_root=str(tmp_path / "arabic"), max_iter=5)
    assert len(read_csv(tmp_path / "e" / "eigen.csv")) == 3 * 2
    write_gray_folders(tmp_path / "odd", 4, odd=True)
    with pytest.raises(BionetsError, match="must all be square and of one size"):
        fewshot(tmp_path / "g", fractions=[1.0], seeds=1, data_root=str(tmp_path / "odd"), max_iter=1)


def test_experiment_cli(tmp_path, capsys, request):
    from bionets.cli import main

    args = ["experiment", "gaussian", "cases=[identical]", "n_min=8", "n_max=32", "points=2", "seeds=1",
            "weight_decay=1e-3", "n_test=2000", "--out", str(tmp_path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err == ""                                # in a log: no progress bar
    out = captured.out
    assert "identical covariances: Bayes" in out and "d=2, 1 seed;" in out
    assert "never" not in out and "+-" not in out           # one seed: no spread to show
    assert (tmp_path / "gaussian.csv").exists()
    assert main(["experiment", "gaussian", "case=[identical]", "--out", str(tmp_path)]) == 2
    assert main(["experiment", "gaussian", "n_max=32", "boundary_n=[1000]", "--out", str(tmp_path)]) == 2
    assert "boundary_n [1000] lies outside n_min=8 .. n_max=32: give sizes in that range" in capsys.readouterr().err
    assert main(args[:2] + ["cases=[identical,identical]"] + args[3:]) == 0      # a case given twice: once
    assert (tmp_path / "gaussian.csv").read_text().count("identical,") == 4        # 2 models x 2 sizes
    assert (tmp_path / "gaussian_boundaries.png").exists()
    assert main(args[:2] + ["dim=3"] + args[2:]) == 0                               # no 2-D figure, no stale one
    assert not (tmp_path / "gaussian_boundaries.png").exists()
    terminal = request.getfixturevalue("terminal_stderr")   # on a terminal: a bar over the fits
    assert main(args) == 0
    assert "gaussian (fits): " in terminal.getvalue() and "/4 " in terminal.getvalue()
