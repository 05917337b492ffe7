"""Tiny datasets written in their genuine on-disk formats (for tests and benchmarks; never real data)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar(root: Path, classes: int = 10, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10 (5 data batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta) pickles."""
    rng = np.random.default_rng(seed)

    def batch(n, key):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):                  # n_train images over the 5 files, the first n_train % 5 one more
            size = n_train // 5 + (i <= n_train % 5)
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(size, "labels")))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test, "labels")))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(n_train, "fine_labels")))
        (folder / "test").write_bytes(pickle.dumps(batch(n_test, "fine_labels")))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0, gz: bool = False) -> Path:
    """MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (``gz``: only their .gz files)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for name, array in ((f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28))),
                            (f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))):
            data = idx_bytes(array)
            (raw / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return raw


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root
