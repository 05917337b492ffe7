"""Datasets read from their genuine on-disk formats through the same code path as real data."""
import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bionets.data import DATASETS, build_data, gaussian_classes, sample_gaussian
from bionets.data.config import DataConfig, GaussianConfig
from bionets.data.fakes import idx_bytes, write_cifar, write_image_folder, write_mnist
from bionets.data.subset import long_tailed, stratified_fraction
from bionets.data.tensor_loader import TensorLoader
from bionets.errors import BionetsError

CIFAR_MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)


def batches(loader):
    return list(iter(loader))


def one_line_error(cfg: DataConfig, *needles: str, **kwargs) -> str:
    with pytest.raises(BionetsError) as err:
        build_data(cfg, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------- the datasets on disk and bundled


def test_registry_lists_every_dataset():
    assert sorted(DATASETS) == ["cifar10", "cifar100", "digits", "gaussian", "imagefolder", "mnist"]


def test_digits_split_shapes_stratification_and_normalization():
    b = build_data(DataConfig(name="digits", batch_size=64, augment=False))
    assert (b.num_classes, b.in_chans, b.img_size, b.classes) == (10, 1, 8, [str(i) for i in range(10)])
    assert len(b.train.targets) == 1437 and len(b.test.targets) == 360
    counts = torch.bincount(b.test.targets)
    assert counts.min() >= 35 and counts.max() <= 37                     # a stratified 20% of each class
    x, y = batches(b.train)[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert b.train.images.max() == 1.0                                   # values / 16
    every = torch.cat([xb for xb, _ in batches(b.train)])                # normalized by the train split's stats
    assert abs(every.mean().item()) < 0.05 and abs(every.std().item() - 1) < 0.05
    again = build_data(DataConfig(name="digits"), seed=5)                # the split ignores the run seed
    assert torch.equal(again.test.targets, b.test.targets) and torch.equal(again.test.images, b.test.images)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles_load_through_torchvision(tmp_path, classes):
    folder = write_cifar(tmp_path, classes=classes, n_train=50, n_test=20)
    b = build_data(DataConfig(name=f"cifar{classes}", root=str(tmp_path), batch_size=10))
    assert (b.num_classes, b.in_chans, b.img_size, len(b.train), len(b.test)) == (classes, 3, 32, 5, 1)
    assert b.classes[:2] == (["class0", "class1"] if classes == 10 else ["c0", "c1"])
    with open(folder / ("test_batch" if classes == 10 else "test"), "rb") as f:
        written = pickle.load(f)
    raw = torch.from_numpy(written["data"]).view(-1, 3, 32, 32).float() / 255
    x, y = batches(b.test)[0]
    torch.testing.assert_close(x, (raw - CIFAR_MEAN) / CIFAR_STD)       # the spec's normalization
    assert y.tolist() == written["labels" if classes == 10 else "fine_labels"]
    assert batches(b.train)[0][0].shape == (10, 3, 32, 32)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_load(tmp_path, gz):
    raw = write_mnist(tmp_path, n_train=40, n_test=20, gz=gz)
    b = build_data(DataConfig(name="mnist", root=str(tmp_path), batch_size=8, augment=False, normalize=False))
    assert (b.num_classes, b.in_chans, b.img_size, len(b.train), b.classes[0]) == (10, 1, 28, 5, "0 - zero")
    name = "t10k-images-idx3-ubyte"
    data = gzip.decompress((raw / f"{name}.gz").read_bytes()) if gz else (raw / name).read_bytes()
    images = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).view(20, 1, 28, 28)
    assert torch.equal(torch.cat([x for x, _ in b.test]), images.float() / 255)


def test_image_folder_with_timm_transforms_and_mixup(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), batch_size=2, img_size=32,
                     auto_augment="rand-m9-mstd0.5", reprob=0.25, mixup=0.8, cutmix=1.0)
    b = build_data(cfg, label_smoothing=0.1)
    assert b.classes == ["cat", "dog"] and (b.num_classes, b.in_chans, b.img_size, len(b.train)) == (2, 3, 32, 3)
    x, y = next(iter(b.train))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    mixed, soft = b.mixup(x, y)
    assert mixed.shape == x.shape and soft.shape == (2, 2) and torch.allclose(soft.sum(1), torch.ones(2))
    assert soft.min() >= 0.05 - 1e-6                                     # label smoothing 0.1 over 2 classes
    order = lambda e: (b.train.set_epoch(e), list(b.train.sampler))[1]  # noqa: E731
    assert order(0) != order(1) and order(1) == order(1)
    ranks = [build_data(cfg.model_copy(update={"batch_size": 4}), rank=r, world_size=2) for r in range(2)]    # val: every image exactly once
    assert sorted(i for r in ranks for i in r.test.sampler) == list(range(6))
    assert sum(len(yb) for r in ranks for _, yb in r.test) == 6


# ---------------------------------------------------------------- augmentation and ordering


def shifted_copies(image: torch.Tensor, pad: int) -> torch.Tensor:
    """Every crop of ``image`` zero-padded by ``pad`` (the candidates of a random crop)."""
    p = F.pad(image, (pad,) * 4)
    h, w = image.shape[-2:]
    return torch.stack([p[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)])


def match_augmentation(loader, pad):
    """For each augmented image of batch 0: (is an unflipped crop, is a flipped crop) of its source."""
    x, _ = batches(loader)[0]
    source = loader.images[loader.indices()[:len(x)]].float()
    source = source / 255 if loader.images.dtype == torch.uint8 else source
    found = []
    for out, img in zip(x * loader.std + loader.mean, source):
        crops = shifted_copies(img, pad)
        same = lambda cands: bool(((cands - out).abs().amax((1, 2, 3)) < 1e-5).any())  # noqa: E731
        found.append((same(crops), same(crops.flip(-1))))
    return found


def test_cifar_augmentation_is_pad4_crop_and_flip(tmp_path):
    write_cifar(tmp_path, classes=10, n_train=100, n_test=10)
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path), batch_size=50), seed=3)
    found = match_augmentation(b.train, pad=4)
    assert all(plain or flipped for plain, flipped in found)             # each is a pad-4 crop (maybe flipped)
    assert any(flipped and not plain for plain, flipped in found)        # some are flipped
    assert any(plain and not flipped for plain, flipped in found)


def test_digits_augmentation_shifts_without_flip():
    b = build_data(DataConfig(name="digits", batch_size=64), seed=3)
    found = match_augmentation(b.train, pad=1)
    assert all(plain for plain, _ in found)                              # a 1-pixel shift, never a mirror image
    plain = build_data(DataConfig(name="digits", batch_size=64, augment=False), seed=3)
    assert not torch.equal(batches(b.train)[0][0], batches(plain.train)[0][0])   # and it changes images


def test_augmentation_replays_per_seed_and_epoch():
    make = lambda seed: build_data(DataConfig(name="digits", batch_size=32), seed=seed).train  # noqa: E731
    a, b = make(1), make(1)
    a.set_epoch(3)
    b.set_epoch(3)
    first = batches(a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, batches(b)))
    assert torch.equal(first[0][0], batches(a)[0][0])                    # iterating the epoch twice: the same
    a.set_epoch(4)
    assert not torch.equal(first[0][0], batches(a)[0][0])                # another epoch: another order/augment
    other = make(2)
    other.set_epoch(3)
    assert not torch.equal(first[0][0], batches(other)[0][0])            # another seed: another order/augment
    plain = build_data(DataConfig(name="digits", batch_size=32, augment=False), seed=1).train
    plain.set_epoch(3)
    a.set_epoch(3)
    assert plain.indices().tolist() == a.indices().tolist()              # augmentation leaves the order alone


def test_in_memory_splits_move_to_a_device_and_build_their_batches_there(tmp_path):
    """``DataBundle.to`` (the engine calls it on CUDA) moves in-memory splits; every batch is then
    built on that device with the same CPU random draws. The 'meta' device stands in for a GPU here:
    a CPU tensor mixed into a meta computation raises, so this finds a tensor left behind."""
    write_cifar(tmp_path, classes=10, n_train=100, n_test=10)
    bundle = build_data(DataConfig(name="cifar10", root=str(tmp_path), batch_size=50), seed=3).to("meta")
    for loader in (bundle.train, bundle.test):
        x, y = next(iter(loader))
        assert x.device.type == y.device.type == "meta" and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (10, 3, 32, 32)
    folder = write_image_folder(tmp_path / "folder", per_class=2, size=8)
    streamed = build_data(DataConfig(name="imagefolder", root=str(folder), batch_size=2, img_size=8)).to("meta")
    x, _ = next(iter(streamed.train))
    assert x.device.type == "cpu"                                         # streaming loaders are left alone


def test_ddp_global_batch_is_the_single_process_batch():
    n, global_batch, world = 103, 12, 3
    ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)          # each image holds its own index
    make = lambda rank, ws: TensorLoader(ids, torch.zeros(n), global_batch // ws, train=True, mean=(0.0,),  # noqa: E731
                                         std=(1.0,), rank=rank, world_size=ws, seed=7)
    one, ranks = make(0, 1), [make(r, world) for r in range(world)]
    for loader in [one, *ranks]:
        loader.set_epoch(2)
    assert len(one) == len(ranks[0]) == n // global_batch
    per_rank = [batches(r) for r in ranks]
    for k, (x, _) in enumerate(batches(one)):
        union = torch.cat([per_rank[r][k][0] for r in range(world)]).flatten().long()
        assert len(union) == global_batch and sorted(union.tolist()) == sorted(x.flatten().long().tolist())
    shards = [TensorLoader(ids, torch.zeros(n), 10, train=False, mean=(0.0,), std=(1.0,), rank=r, world_size=world)
              for r in range(world)]
    served = sorted(int(v) for s in shards for x, _ in s for v in x.flatten())
    assert served == list(range(n))                                      # test: every sample once, no padding
    assert [len(s) for s in shards] == [4, 4, 4]
    few = TensorLoader(ids[:1], torch.zeros(1), 10, train=False, mean=(0.0,), std=(1.0,), rank=2, world_size=3)
    assert len(few) == 0 and list(few) == []                             # a rank beyond the test split: nothing
    a, b = build_data(DataConfig(name="digits", batch_size=64)), build_data(DataConfig(name="digits", batch_size=64),
                                                                            rank=1, world_size=2)
    assert len(a.train) == len(b.train) == 1437 // 64 and len(batches(b.train)[0][1]) == 32


# ---------------------------------------------------------------- subsets and synthetic classes


def test_train_fraction_is_stratified_and_seeded():
    y = torch.arange(10).repeat_interleave(100)
    keep = stratified_fraction(y, 0.05, seed=0)
    assert torch.bincount(y[keep]).tolist() == [5] * 10
    assert stratified_fraction(y, 0.001, seed=0).numel() == 10           # at least one per class
    assert torch.equal(keep, stratified_fraction(y, 0.05, seed=0))
    assert not torch.equal(keep, stratified_fraction(y, 0.05, seed=1))
    full = build_data(DataConfig(name="digits", batch_size=16)).train.targets
    b = build_data(DataConfig(name="digits", train_fraction=0.1, batch_size=16), seed=4)
    share = torch.bincount(b.train.targets, minlength=10) / torch.bincount(full, minlength=10)
    assert 140 <= len(b.train.targets) <= 146 and share.min() > 0.08 and share.max() < 0.12


def test_imbalance_follows_the_long_tail_profile():
    y = torch.arange(10).repeat_interleave(100)
    counts = torch.bincount(y[long_tailed(y, 10.0, seed=0)]).tolist()
    assert counts == [int(100 * 10.0 ** (-k / 9)) for k in range(10)]    # n_max * ratio^(-k/(K-1))
    assert counts[0] == 100 and counts[-1] == 10
    b = build_data(DataConfig(name="digits", imbalance_ratio=20, batch_size=16))
    per_class = torch.bincount(b.train.targets).tolist()
    n_max = min(torch.bincount(build_data(DataConfig(name="digits")).train.targets).tolist())
    assert per_class == [int(n_max * 20 ** (-k / 9)) for k in range(10)]


def test_gaussian_classes_statistics():
    cfg = GaussianConfig(dim=3, kind="different", separation=2.0, seed=2)
    means, covs = gaussian_classes(cfg)
    assert means.dtype == covs.dtype == torch.float64 and covs.shape == (2, 3, 3)
    torch.testing.assert_close(means.norm(dim=1), torch.ones(2, dtype=torch.float64))   # separation / 2
    assert not torch.allclose(covs[0], covs[1])
    eig = torch.linalg.eigvalsh(covs)
    assert eig.min() >= 0.25 - 1e-9 and eig.max() <= 2.5 + 1e-9
    for seed in range(6):        # one dimension: the two means on opposite sides (random signs coincided half the time)
        one_d = gaussian_classes(GaussianConfig(dim=1, separation=4.0, seed=seed))[0]
        assert sorted(one_d[:, 0].tolist()) == [-2.0, 2.0]
    same = gaussian_classes(GaussianConfig(dim=3, kind="identical"))[1]
    assert torch.equal(same[0], same[1])
    x, y = sample_gaussian(means, covs, 40001, torch.Generator().manual_seed(0))
    assert torch.bincount(y).tolist() == [20001, 20000] and y.dtype == torch.int64
    for k in range(2):
        xk = x[y == k].double()
        torch.testing.assert_close(xk.mean(0), means[k], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(xk.T), covs[k], atol=0.08, rtol=0)


def test_gaussian_dataset_is_raw_samples():
    cfg = DataConfig(name="gaussian", batch_size=50, gaussian=GaussianConfig(dim=4, num_classes=3, n_train=300))
    b = build_data(cfg)
    assert (b.in_chans, b.img_size, b.num_classes, len(b.train)) == (4, 1, 3, 6)
    x, _ = batches(b.test)[0]
    assert torch.equal(x, b.test.images[:100])                           # no augmentation, no normalization
    assert torch.bincount(b.train.targets).tolist() == [100, 100, 100]


# ---------------------------------------------------------------- bad input: one line each


def test_root_not_set_missing_or_empty(tmp_path):
    for name in ("cifar10", "cifar100", "mnist", "imagefolder"):
        one_line_error(DataConfig(name=name), "data.root is not set", "pass --data-root DIR")
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "nope")), "is missing", "nope")
    (tmp_path / "empty").mkdir()
    one_line_error(DataConfig(name="mnist", root=str(tmp_path / "empty")), "is empty", "data.download=true")
    # nothing downloads an image folder: its error does not suggest it
    said = one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "nope"), download=True), "is missing",
                          "put the image folders there")
    assert "download" not in said
    one_line_error(DataConfig(name="imagefolder"), "data.root is not set for dataset 'imagefolder'")


def test_unknown_dataset_names_the_nearest():
    one_line_error(DataConfig(name="cifar11"), "unknown dataset 'cifar11'", "did you mean: cifar10")
    one_line_error(DataConfig(name="imagenet"), "unknown dataset 'imagenet'", "imagefolder")


def test_batch_must_divide_over_processes_and_fit_the_split():
    one_line_error(DataConfig(name="digits", batch_size=63), "batch_size=63", "divide evenly over 2 processes",
                   world_size=2)
    one_line_error(DataConfig(name="digits", batch_size=2048), "1437 samples", "lower data.batch_size")
    one_line_error(DataConfig(name="digits", batch_size=6, mixup=0.2), "even batch per process, got 3",
                   world_size=2)


def test_wrong_cifar_files(tmp_path):
    folder = write_cifar(tmp_path / "c", classes=10)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), "not in CIFAR's python-pickle format")
    (folder / "data_batch_1").write_bytes(pickle.dumps({"something": "else"}))
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), "not in CIFAR's python-pickle format")
    (folder / "data_batch_1").unlink()           # a partial copy: it said "no cifar10", the folder being there
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), f"cifar10 folder '{folder}' lacks "
                   "data_batch_1: extract cifar-10-python.tar.gz there again")
    one_line_error(DataConfig(name="cifar10", root=str(folder)), "is cifar10's own folder: give its parent folder")
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "cifar-10-python.tar.gz").write_bytes(b"x")
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "archive")), "holds cifar-10-python.tar.gz but not "
                   "its files: extract it there", "if tar finds it damaged")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    one_line_error(DataConfig(name="cifar100", root=str(tmp_path / "other")), "no cifar100 under", "cifar-100-python")
    # a batch whose images and labels differ in number, or whose pixels are not uint8: one line (it
    # shifted every later label by the difference, or served 0..255 pixels unscaled)
    for data in (np.zeros((10, 3072), np.uint8), np.zeros((7, 3072), np.int64)):
        (folder / "data_batch_1").write_bytes(pickle.dumps({"data": data, "labels": [0] * 7}))
        one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), "not one uint8 image per label")
    # fewer class names than classes: the class count came from them, and the loss failed on label 9
    write_cifar(tmp_path / "e", classes=10, n_test=0)      # said its labels were not integers
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "e")), "holds no images in one of its splits")
    folder = write_cifar(tmp_path / "d", classes=10)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "d")), "cifar10's batches.meta under",
                   "names 2 classes, not 10")


def test_mnist_in_torchvisions_old_processed_layout_loads(tmp_path):
    """MNIST/processed/{training,test}.pt, torchvision's former layout, loads as the raw files do."""
    write_mnist(tmp_path / "raw")
    from bionets.data.sources import load_mnist
    x, y, xt, yt, _ = load_mnist(str(tmp_path / "raw"), False)
    (tmp_path / "old" / "MNIST" / "processed").mkdir(parents=True)
    torch.save((x[:, 0], y), tmp_path / "old" / "MNIST" / "processed" / "training.pt")
    torch.save((xt[:, 0], yt), tmp_path / "old" / "MNIST" / "processed" / "test.pt")
    old = load_mnist(str(tmp_path / "old"), False)
    assert all(torch.equal(a, b) for a, b in zip(old[:4], (x, y, xt, yt)))


def test_wrong_mnist_files(tmp_path):
    raw = write_mnist(tmp_path)
    cfg = DataConfig(name="mnist", root=str(tmp_path))
    good = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + good[4:])       # bad magic number
    one_line_error(cfg, "not valid idx files")
    (raw / "train-images-idx3-ubyte").write_bytes(good[:1000])                           # truncated
    one_line_error(cfg, "not valid idx files")
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((40, 28), np.uint8)))  # 2-d, not images
    one_line_error(cfg, "not valid idx files")
    (raw / "train-images-idx3-ubyte").unlink()
    one_line_error(cfg, f"MNIST under '{raw}' lacks train-images-idx3-ubyte (optionally .gz): copy them there")
    one_line_error(DataConfig(name="mnist", root=str(raw)), f"'{raw}' is MNIST's own folder: give the folder that "
                   f"holds MNIST/raw, '{tmp_path}'")
    one_line_error(DataConfig(name="mnist", root=str(tmp_path / "MNIST")), "is MNIST's own folder")


def test_wrong_image_folders(tmp_path):
    write_image_folder(tmp_path / "f")
    shutil.rmtree(tmp_path / "f" / "val")
    one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "f")), "has no 'val/' folder")
    shutil.rmtree(tmp_path / "f" / "train")
    (tmp_path / "f" / "val").mkdir()
    one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "f")), "has no 'train/' folder")
    write_image_folder(tmp_path / "g")
    for png in (tmp_path / "g" / "val" / "dog").iterdir():
        png.unlink()
    one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "g"), batch_size=2), "imagefolder", "val",
                   "Found no valid file for the classes dog", "add images to those class folders, or remove them")
    write_image_folder(tmp_path / "one", classes=("cat",))          # trained silently on one class
    one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "one"), batch_size=2),
                   "has one class folder (cat): a classifier needs two or more")
    write_image_folder(tmp_path / "h")
    one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "h"), batch_size=2, auto_augment="rand-q9"),
                   "data.auto_augment='rand-q9'", "rand-m9-mstd0.5")
    # a hidden folder is no class: Jupyter's .ipynb_checkpoints with copies of images (trained as a
    # class of its own), or empty (a "no valid file" error)
    shutil.copytree(tmp_path / "h" / "train" / "cat", tmp_path / "h" / "train" / ".ipynb_checkpoints")
    (tmp_path / "h" / "val" / ".cache").mkdir()
    bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "h"), batch_size=2, img_size=16))
    assert bundle.classes == ["cat", "dog"] and bundle.num_classes == 2


def test_bad_labels_truncated_gz_and_unreadable_images_are_one_line(tmp_path):
    """Each used to end in a traceback: a CIFAR label out of range (inside the loss), a corrupt image
    (inside the DataLoader, in a worker too); and a truncated .gz left a partial idx file behind, so
    the run failed again after the .gz was replaced."""
    folder = write_cifar(tmp_path / "c", classes=10)
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    batch["labels"][0] = 12
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), "has label 12 outside 0..9")
    # labels that are not integers: strings failed inside torch, fractions trained as some class
    for labels in (["cat"] * len(batch["labels"]), [1.5] * len(batch["labels"])):
        (folder / "data_batch_1").write_bytes(pickle.dumps({**batch, "labels": labels}))
        one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), "labels that are not one integer")
    # a pickle naming a module or a class that does not exist (ImportError, AttributeError)
    # or whose calls fail: an unknown encoding (LookupError), a division by zero
    for bad in (b"cnosuchmodule\nFoo\n)R.", b"cbuiltins\nnotathing\n)R.",
                b"c_codecs\nencode\n(Vx\nVnosuchcodec\ntR.", b"coperator\ntruediv\n(I1\nI0\ntR."):
        (folder / "data_batch_1").write_bytes(bad)
        one_line_error(DataConfig(name="cifar10", root=str(tmp_path / "c")), "not in CIFAR's python-pickle format")

    raw = write_mnist(tmp_path / "m", gz=True)
    good = (raw / "train-images-idx3-ubyte.gz").read_bytes()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good[:50])
    one_line_error(DataConfig(name="mnist", root=str(tmp_path / "m")), "cannot decompress")
    assert not (raw / "train-images-idx3-ubyte").exists()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good[:20] + bytes(255 - b for b in good[20:60]) + good[60:])
    one_line_error(DataConfig(name="mnist", root=str(tmp_path / "m")), "cannot decompress")   # (a zlib.error)
    assert not [p.name for p in raw.iterdir() if not p.name.endswith(".gz")]      # no partial file, no scratch
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good)
    assert build_data(DataConfig(name="mnist", root=str(tmp_path / "m"), batch_size=8)).num_classes == 10

    write_image_folder(tmp_path / "f", per_class=3)
    next((tmp_path / "f" / "train" / "cat").iterdir()).write_bytes(b"not an image")
    for workers in (0, 1):
        bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "f"), batch_size=6, img_size=16,
                                       workers=workers))
        with pytest.raises(BionetsError, match=r"^imagefolder image '.*cat.*' cannot be read \(UnidentifiedImageError\)"):
            batches(bundle.train)

    write_image_folder(tmp_path / "g")
    (tmp_path / "g" / "val" / "dog").rename(tmp_path / "g" / "val" / "cow")
    one_line_error(DataConfig(name="imagefolder", root=str(tmp_path / "g"), batch_size=2),
                   "only in train/: ['dog']; only in val/: ['cow']")


def test_hidden_files_inside_class_folders_give_no_images(tmp_path):
    """Jupyter's .ipynb_checkpoints inside a class folder (copies of its images: trained and tested as
    that class) and macOS's ._ files (unreadable: the run stopped) give no samples."""
    write_image_folder(tmp_path, per_class=2)
    cat = tmp_path / "val" / "cat"
    shutil.copytree(cat, cat / ".ipynb_checkpoints")
    (cat / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path), batch_size=2, img_size=16))
    files = [Path(p).relative_to(tmp_path / "val") for p, _ in bundle.test.loader.dataset.samples]
    assert len(files) == 4 and not any(part.startswith(".") for f in files for part in f.parts)


def test_sixteen_bit_grayscale_images_keep_their_gray(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16 or I), which PIL's RGB conversion clipped to white, is
    scaled to 8 bits: 19532 / 65535 reads as 76 / 255, as its 8-bit twin does."""
    from PIL import Image

    from bionets.data.imagefolder import load_image
    Image.fromarray(np.full((6, 6), 19532, dtype=np.uint16)).save(tmp_path / "wide.png")
    Image.fromarray(np.full((6, 6), 76, dtype=np.uint8)).save(tmp_path / "narrow.png")
    wide, narrow = load_image(str(tmp_path / "wide.png")), load_image(str(tmp_path / "narrow.png"))
    assert wide.mode == narrow.mode == "RGB" and np.array_equal(np.asarray(wide), np.asarray(narrow))
    # mode I (older Pillows' 16-bit PNG, 32-bit TIFF) by the mode's range: a dim image stays the dimmer
    for value in (199, 4095):
        Image.fromarray(np.full((6, 6), value, dtype=np.int32), "I").save(tmp_path / f"{value}.tif")
    dim, bright = (np.asarray(load_image(str(tmp_path / f"{v}.tif")))[0, 0, 0] for v in (199, 4095))
    assert (dim, bright) == (1, 16)


@pytest.mark.parametrize("policy", ["rand-m10-mstd0-inc1", "v0"])
def test_posterize_to_no_bits_is_a_black_image_not_an_error(tmp_path, policy):
    """RandAugment's 'inc' levels at magnitude 10 and AutoAugment's 'v0' posterize to 0 bits, which
    Pillow 13 refuses (an ImageNet epoch ended on a traceback): it gives a black image, as Pillow <= 12
    did, and the training transform runs on many draws."""
    import random

    from PIL import Image

    from bionets.data.imagefolder import posterize
    write_image_folder(tmp_path, per_class=2)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), batch_size=2, img_size=16, auto_augment=policy)
    transform = build_data(cfg).train.loader.dataset.transform
    image = Image.fromarray(np.random.default_rng(0).integers(1, 255, (16, 16, 3), dtype=np.uint8))
    assert np.asarray(posterize(image, 0)).max() == 0 and posterize(image, 8) is image
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(300):
        transform(image)


def test_image_folder_random_erasing_mode(tmp_path):
    """Random erasing fills with per-pixel noise by default, as timm's train.py and the DeiT / ConvNeXt
    recipes do (timm's create_transform alone defaults to a constant)."""
    write_image_folder(tmp_path, per_class=2)
    for mode in ("pixel", "const"):
        cfg = DataConfig(name="imagefolder", root=str(tmp_path), batch_size=4, img_size=16, reprob=0.25,
                         **({} if mode == "pixel" else {"remode": mode}))
        erasing = build_data(cfg).train.loader.dataset.transform.transforms[-1]
        assert type(erasing).__name__ == "RandomErasing" and erasing.mode == mode


def test_image_folder_without_augmentation_or_normalization(tmp_path):
    """augment=false: the training split resized and center-cropped like the validation one;
    normalize=false: pixel values in [0, 1] and an identity mean/std."""
    write_image_folder(tmp_path, per_class=2)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), batch_size=4, img_size=16, augment=False, normalize=False)
    b = build_data(cfg)
    assert (b.mean, b.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x1, _ = next(iter(b.train))
    dataset = b.train.loader.dataset
    assert [type(t).__name__ for t in dataset.transform.transforms] == ["Resize", "CenterCrop", "MaybeToTensor",
                                                                        "Normalize"]
    assert 0.0 <= x1.min() and x1.max() <= 1.0
    x2, _ = next(iter(build_data(cfg).train))
    assert torch.equal(x1.sort(0).values, x2.sort(0).values)      # deterministic images (only the order is shuffled)


def test_gaussian_kind_is_validated_with_the_config():
    with pytest.raises(BionetsError, match="config key 'kind': Input should be 'identical' or 'different'"):
        GaussianConfig(kind="weird")


@pytest.mark.parametrize("name, module", [("cifar10", "cifar"), ("mnist", "mnist")])
def test_failed_download_is_one_line(tmp_path, monkeypatch, name, module):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", offline)
    one_line_error(DataConfig(name=name, root=str(tmp_path / "new"), download=True),
                   f"downloading {name} failed", "no network", "--data-root")


def test_imagefolder_interpolation_option(tmp_path):
    """interpolation='random' (timm train.py's default, the Dit-ConvNeXt recipe's) draws bilinear or
    bicubic for each training crop; validation resizes bicubic; the default stays bicubic."""
    from bionets.data.imagefolder import image_folders
    root = write_image_folder(tmp_path / "f")
    for choice, train_modes in (("random", {"bilinear", "bicubic"}), ("bicubic", {"bicubic"})):
        cfg = DataConfig(name="imagefolder", root=str(root), img_size=16, interpolation=choice)
        train, val = image_folders(cfg, root)
        crop, resize = train.transform.transforms[0], val.transform.transforms[0]
        modes = crop.interpolation if isinstance(crop.interpolation, (list, tuple)) else [crop.interpolation]
        assert {m.value for m in modes} == train_modes and resize.interpolation.value == "bicubic"
        assert train[0][0].shape == (3, 16, 16)
