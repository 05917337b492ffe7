"""Reading each dataset's genuine on-disk format into tensors.

CIFAR and MNIST are read through torchvision's own classes, so a test's tiny files in the real
formats take exactly the code path of the real datasets. torchvision's CIFAR classes verify the
files' md5 sums, which tiny test files cannot match; the subclasses below check only that the
files exist (a file in the wrong format still fails, with a one-line error, when it is read).
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import extract_archive

from bionets.errors import BionetsError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# what a file in the wrong format raises inside torchvision's readers (idx: assert on the magic number;
# a pickle naming a class that does not exist: ImportError or AttributeError; one whose calls fail:
# any of these, or ZeroDivisionError; an unknown text encoding: LookupError; a size read from damaged
# bytes: MemoryError)
FORMAT_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, AssertionError,
                 ImportError, AttributeError, LookupError, ArithmeticError, MemoryError)


_OPTIONS: ContextVar[tuple[str, str | None]] = ContextVar("data_options",
                                                         default=("--data-root DIR", "data.download=true"))


@contextmanager
def data_options(root: str, download: str | None) -> Iterator[None]:
    """Name, in the errors below, the settings of the command that reads the data: ``root`` how it
    sets the data root ('--data-root DIR' for ``bionets train``, the default), ``download`` how it
    turns downloading on (None: it cannot)."""
    token = _OPTIONS.set((root, download))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def _fix() -> str:
    """'fix --data-root DIR or set data.download=true' in the settings of the command running."""
    root, download = _OPTIONS.get()
    return f"fix {root}" + (f" or set {download}" if download else "")


def _exists_only(self) -> bool:
    """Whether the files of this split (``train``) exist: a test split reads without the training one."""
    folder = Path(self.root) / self.base_folder
    return all((folder / name).is_file() for name, _ in (self.train_list if self.train else self.test_list))


def _load_meta_unchecked(self) -> None:
    path = Path(self.root) / self.base_folder / self.meta["filename"]
    if not path.is_file():
        raise RuntimeError(f"missing {path.name}")
    with path.open("rb") as f:
        self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
    self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR10 that checks that its files exist instead of their md5 sums."""

    _check_integrity = _exists_only
    _load_meta = _load_meta_unchecked


class CIFAR100Files(datasets.CIFAR100):
    """torchvision's CIFAR100 that checks that its files exist instead of their md5 sums."""

    _check_integrity = _exists_only
    _load_meta = _load_meta_unchecked


def require_root(root: str | None, name: str, download: bool | None) -> Path:
    """``root`` as a Path; a one-line error when it is unset, or missing/empty without ``download``
    (None: the image folders, which nothing downloads)."""
    if root is None:
        raise BionetsError(f"data.root is not set for dataset '{name}': pass {_OPTIONS.get()[0]}")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise BionetsError(f"data root '{path}' is a file, not a folder: give the folder that holds (or is to hold) "
                           f"the dataset with {_OPTIONS.get()[0]}")
    if not download and (not path.is_dir() or not any(path.iterdir())):
        state = "empty" if path.is_dir() else "missing"
        root_option, download_option = _OPTIONS.get()
        what = name if download is not None else "the image folders"
        fetch = f", or set {download_option} on a machine with internet" if download is not None and download_option \
            else ""
        raise BionetsError(f"data root '{path}' is {state}: put {what} there (see docs/data.md) or give its "
                           f"location with {root_option}{fetch}")
    if download:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _download_failed(name: str, err: Exception) -> BionetsError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    cause = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
    return BionetsError(f"downloading {name} failed ({cause}): copy the files under the data root "
                        f"({_OPTIONS.get()[0]}) by hand (see docs/data.md)")


def load_cifar(root: str | None, download: bool, classes: int, train: bool = True) -> tuple:
    """(train images uint8 NCHW, train targets, test images, test targets, class names); without
    ``train`` the training split is not read (its files may be absent) and comes back empty."""
    name, cls, folder = ("cifar10", CIFAR10Files, "cifar-10-batches-py") if classes == 10 else \
        ("cifar100", CIFAR100Files, "cifar-100-python")
    path = require_root(root, name, download)
    splits = [] if train else [torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)]
    for split in (True, False)[0 if train else 1:]:
        try:
            ds = cls(str(path), train=split, download=download)
        except OSError as err:
            if download:
                raise _download_failed(name, err) from None
            raise BionetsError(f"cannot read {name} under '{path / folder}' ({type(err).__name__}: {err})") from None
        except RuntimeError:
            raise _cifar_not_found(name, cls, path) from None
        except FORMAT_ERRORS as err:
            raise BionetsError(f"{name} files under '{path / folder}' are not in CIFAR's python-pickle format "
                               f"({type(err).__name__}): re-download them") from None
        if ds.data.dtype != np.uint8 or ds.data.ndim != 4 or len(ds.data) != len(ds.targets):
            raise BionetsError(f"{name} files under '{path / folder}' hold {len(ds.data)} images ({ds.data.dtype}) "
                               f"and {len(ds.targets)} labels, not one uint8 image per label: re-download them")
        targets = check_labels(ds.targets, classes, f"{name} under '{path / folder}'")
        splits += [torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))), targets]
    if not isinstance(ds.classes, list) or len(ds.classes) != classes:     # (the class count comes from it)
        count = len(ds.classes) if isinstance(ds.classes, list) else f"a {type(ds.classes).__name__} of"
        raise BionetsError(f"{name}'s {cls.meta['filename']} under '{path / folder}' names {count} classes, not "
                           f"{classes}: the files are corrupt or from another dataset; re-download them")
    return (*splits, list(ds.classes))


def _cifar_not_found(name: str, cls: type, path: Path) -> BionetsError:
    """What is wrong where torchvision finds no CIFAR files under ``path``: files missing from their
    folder, the archive not extracted, the folder itself given as the root, or nothing there."""
    folder = path / cls.base_folder
    if folder.is_dir():
        wanted = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [f for f in wanted if not (folder / f).is_file()]
        return BionetsError(f"{name} folder '{folder}' lacks {', '.join(missing)}: extract {cls.filename} there "
                            f"again (or download it again)")
    if (path / cls.filename).is_file():
        return BionetsError(f"'{path}' holds {cls.filename} but not its files: extract it there (tar xzf "
                            f"{path / cls.filename} -C {path}; if tar finds it damaged, an interrupted download, "
                            "download it again)")
    if path.name == cls.base_folder:
        return BionetsError(f"'{path}' is {name}'s own folder: give its parent folder, '{path.parent}', as the "
                            "data root")
    return BionetsError(f"no {name} under '{path}' (expected {folder} in the python-pickle format): {_fix()}")


def check_labels(targets, classes: int, what: str) -> torch.Tensor:
    """``targets`` as a tensor, or one error line when they are not integers (strings would fail
    inside torch, fractions would pass as some class) or one lies outside 0..classes-1 (training
    would fail on it deep inside the loss)."""
    try:
        targets = torch.as_tensor(targets)
    except FORMAT_ERRORS:
        targets = None
    if targets is not None and targets.numel() == 0:      # (an empty list reads as float: "not integers")
        raise BionetsError(f"{what} holds no images in one of its splits: the files are truncated; re-download them")
    if targets is None or targets.ndim != 1 or targets.is_floating_point() or targets.is_complex() or \
            targets.dtype == torch.bool:
        raise BionetsError(f"{what} holds labels that are not one integer per image: the files are corrupt or "
                           "from another dataset; re-download them")
    bad = targets[(targets < 0) | (targets >= classes)]
    if len(bad):
        raise BionetsError(f"{what} has label {int(bad[0])} outside 0..{classes - 1}: the files are corrupt or "
                           "from another dataset; re-download them")
    return targets


def _gunzip_missing(raw: Path) -> None:
    """Decompress ``X.gz`` next to itself where only the gzip of an idx file ``X`` is present (what
    torchvision's own download does), so MNIST kept as the original .gz files loads too. Each file is
    decompressed in a temporary folder and then moved into place: a damaged or truncated .gz, or a
    process stopped midway, leaves no partial file to pass for the decompressed one."""
    for name in MNIST_FILES:
        if not (raw / name).is_file() and (raw / f"{name}.gz").is_file():
            scratch = Path(tempfile.mkdtemp(prefix=".gunzip.", dir=raw))
            try:
                extract_archive(str(raw / f"{name}.gz"), str(scratch))
                os.replace(scratch / name, raw / name)
            except (OSError, EOFError, zlib.error) as err:
                raise BionetsError(f"cannot decompress '{raw / name}.gz' ({type(err).__name__}: {err}): "
                                   "decompress it by hand or re-download it") from None
            finally:
                shutil.rmtree(scratch, ignore_errors=True)


class MNISTSplit(datasets.MNIST):
    """torchvision's MNIST that needs only the files of the split it reads."""

    @property
    def raw_folder(self) -> str:
        return str(Path(self.root, "MNIST", "raw"))        # (torchvision's names the folders after the class)

    @property
    def processed_folder(self) -> str:
        return str(Path(self.root, "MNIST", "processed"))  # (the old layout's training.pt and test.pt)

    def _check_exists(self) -> bool:
        prefix = "train" if self.train else "t10k"
        return all(Path(self.raw_folder, name).is_file() for name in MNIST_FILES if name.startswith(prefix))


def load_mnist(root: str | None, download: bool, train: bool = True) -> tuple:
    """(train images uint8 N1HW, train targets, test images, test targets, class names); without
    ``train`` the training split is not read (its files may be absent) and comes back empty."""
    path = require_root(root, "mnist", download)
    raw = path / "MNIST" / "raw"
    if raw.is_dir():
        _gunzip_missing(raw)
    bad_format = BionetsError(f"MNIST files under '{raw}' are not valid idx files: re-download them")
    splits = [] if train else [torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)]
    for split in (True, False)[0 if train else 1:]:
        try:
            ds = MNISTSplit(str(path), train=split, download=download)
        except RuntimeError as err:
            if "Error downloading" in str(err):
                raise _download_failed("mnist", err) from None
            if "not found" in str(err).lower():
                raise _mnist_not_found(path, raw, split) from None
            raise bad_format from None
        except FORMAT_ERRORS:
            raise bad_format from None
        if ds.data.ndim != 3 or len(ds.data) != len(ds.targets):
            raise bad_format
        splits += [ds.data.unsqueeze(1).contiguous(), check_labels(ds.targets.clone(), 10, f"MNIST under '{raw}'")]
    return (*splits, list(datasets.MNIST.classes))


def _mnist_not_found(path: Path, raw: Path, train: bool) -> BionetsError:
    """The one line for MNIST files missing: which ones, and where the root points at MNIST's own folders
    (``MNIST/raw`` or ``MNIST``), its parent."""
    if path.name == "raw" and path.parent.name == "MNIST" or (path / "raw").is_dir() and path.name == "MNIST":
        parent = path.parent.parent if path.name == "raw" else path.parent
        return BionetsError(f"'{path}' is MNIST's own folder: give the folder that holds MNIST/raw, '{parent}'")
    if not raw.is_dir():
        return BionetsError(f"no MNIST under '{path}' (expected {raw}/{{{','.join(MNIST_FILES)}}}, optionally .gz): "
                            f"{_fix()}")
    wanted = [n for n in MNIST_FILES if n.startswith("train" if train else "t10k")]
    missing = [n for n in wanted if not (raw / n).is_file()]
    return BionetsError(f"MNIST under '{raw}' lacks {', '.join(missing)} (optionally .gz): copy them there, or "
                        f"{_fix()}")


def load_digits_split() -> tuple:
    """sklearn's bundled 8x8 digits (values 0..16 -> [0, 1]), a fixed stratified 80/20 split
    (``random_state=0``, independent of the run seed): 1,437 train and 360 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    return x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)]
