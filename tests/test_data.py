"""Datasets read from their genuine on-disk formats through the same code path as real data."""
import pytest
import torch

from bionets.data import build_data, gaussian_classes, sample_gaussian
from bionets.data.config import DataConfig, GaussianConfig
from bionets.data.subset import long_tailed, stratified_fraction
from bionets.errors import BionetsError
from bionets.data.fakes import write_cifar, write_image_folder, write_mnist


def batches(loader):
    return list(iter(loader))


def test_digits_split_shapes_and_stratification():
    b = build_data(DataConfig(name="digits", batch_size=64))
    assert (b.num_classes, b.in_chans, b.img_size) == (10, 1, 8)
    assert len(b.train.targets) == 1437 and len(b.test.targets) == 360
    counts = torch.bincount(b.test.targets)
    assert counts.min() >= 35 and counts.max() <= 37                     # stratified 20%
    x, y = next(iter(b.train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the split does not depend on the run seed
    assert torch.equal(build_data(DataConfig(name="digits"), seed=5).test.targets, b.test.targets)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles_load_through_torchvision(tmp_path, classes):
    write_cifar(tmp_path, classes=classes, n_train=50, n_test=20)
    b = build_data(DataConfig(name=f"cifar{classes}", root=str(tmp_path), batch_size=10))
    assert (b.num_classes, b.in_chans, b.img_size) == (classes, 3, 32)
    assert len(b.train.targets) == 50 and len(batches(b.test)[0][1]) == 20
    x, _ = batches(b.train)[0]
    assert x.shape == (10, 3, 32, 32)
    raw = b.test.images[:4].float() / 255                                # normalization with the spec's stats
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    torch.testing.assert_close(batches(b.test)[0][0][:4], (raw - mean) / std)


def test_mnist_idx_files_load(tmp_path):
    write_mnist(tmp_path, n_train=40, n_test=20)
    b = build_data(DataConfig(name="mnist", root=str(tmp_path), batch_size=8))
    assert (b.num_classes, b.in_chans, b.img_size, len(b.train)) == (10, 1, 28, 5)


def test_image_folder_with_timm_transforms(tmp_path):
    write_image_folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), batch_size=2, img_size=32, auto_augment="rand-m9-mstd0.5",
                     reprob=0.25, mixup=0.8, cutmix=1.0)
    b = build_data(cfg, label_smoothing=0.1)
    assert b.classes == ["cat", "dog"] and len(b.train) == 3
    x, y = next(iter(b.train))
    assert x.shape == (2, 3, 32, 32)
    mixed, soft = b.mixup(x, y)
    assert soft.shape == (2, 2) and torch.allclose(soft.sum(1), torch.ones(2))


def test_augmentation_is_random_but_replays_per_epoch():
    b = build_data(DataConfig(name="digits", batch_size=32), seed=1)
    b.train.set_epoch(3)
    first = batches(b.train)[0][0]
    b.train.set_epoch(3)
    assert torch.equal(first, batches(b.train)[0][0])                    # same epoch -> same batches
    plain = build_data(DataConfig(name="digits", batch_size=32, augment=False), seed=1)
    plain.train.set_epoch(3)
    assert not torch.equal(first, batches(plain.train)[0][0])            # the augmentation does something
    assert plain.train.indices().tolist() == b.train.indices().tolist()  # ... without touching the order


def test_ddp_shards_form_the_single_process_batches():
    one = build_data(DataConfig(name="digits", batch_size=64, augment=False), seed=7)
    ranks = [build_data(DataConfig(name="digits", batch_size=64, augment=False), rank=r, world_size=2, seed=7)
             for r in range(2)]
    for loader in [one.train] + [r.train for r in ranks]:
        loader.set_epoch(2)
    assert len(ranks[0].train) == len(one.train)
    for k, (_, y1) in enumerate(batches(one.train)[:5]):
        ids = sorted(torch.cat([ranks[r].train.indices()[k * 32:(k + 1) * 32] for r in range(2)]).tolist())
        assert ids == sorted(one.train.indices()[k * 64:(k + 1) * 64].tolist())
    test_ids = torch.cat([r.test.indices() for r in ranks]).sort().values
    assert torch.equal(test_ids, torch.arange(360))                      # every test sample once, no padding


def test_train_fraction_is_stratified_and_imbalance_follows_the_profile():
    y = torch.arange(10).repeat_interleave(100)
    keep = stratified_fraction(y, 0.05, seed=0)
    assert torch.bincount(y[keep]).tolist() == [5] * 10
    assert stratified_fraction(y, 0.001, seed=0).numel() == 10           # at least one per class
    lt = torch.bincount(y[long_tailed(y, 10.0, seed=0)]).tolist()
    assert lt[0] == 100 and lt[-1] == 10 and lt == sorted(lt, reverse=True)
    b = build_data(DataConfig(name="digits", train_fraction=0.1, batch_size=16))
    assert 140 <= len(b.train.targets) <= 150


def test_gaussian_classes_statistics():
    cfg = GaussianConfig(dim=3, kind="different", seed=2)
    means, covs = gaussian_classes(cfg)
    assert not torch.allclose(covs[0], covs[1])
    assert torch.allclose(gaussian_classes(GaussianConfig(dim=3, kind="identical"))[1][0],
                          gaussian_classes(GaussianConfig(dim=3, kind="identical"))[1][1])
    x, y = sample_gaussian(means, covs, 40000, torch.Generator().manual_seed(0))
    for k in range(2):
        xk = x[y == k].double()
        torch.testing.assert_close(xk.mean(0), means[k], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(xk.T), covs[k], atol=0.08, rtol=0)
    b = build_data(DataConfig(name="gaussian", batch_size=50))
    assert (b.in_chans, b.img_size, b.num_classes) == (2, 1, 2)


@pytest.mark.parametrize("cfg, message", [
    (dict(name="cifar10"), "data.root is not set"),
    (dict(name="cifar10", root="/nonexistent/x"), "missing or empty"),
    (dict(name="cifar11"), "unknown dataset 'cifar11' (did you mean: cifar10"),
    (dict(name="digits", batch_size=63), "divide evenly over 2 processes"),
    (dict(name="gaussian", gaussian={"kind": "weird"}), "data.gaussian.kind"),
])
def test_bad_input_is_one_line(cfg, message):
    with pytest.raises(BionetsError) as err:
        build_data(DataConfig(**cfg), world_size=2 if cfg.get("batch_size") == 63 else 1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_format_and_missing_split_are_one_line(tmp_path):
    folder = write_cifar(tmp_path / "c", classes=10)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(BionetsError, match="not in CIFAR's python-pickle format"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "c")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    with pytest.raises(BionetsError, match="no cifar100 under"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "other")))
    raw = write_mnist(tmp_path / "m")
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03garbage")
    with pytest.raises(BionetsError, match="not valid idx files"):
        build_data(DataConfig(name="mnist", root=str(tmp_path / "m")))
    write_image_folder(tmp_path / "f")
    import shutil
    shutil.rmtree(tmp_path / "f" / "val")
    with pytest.raises(BionetsError, match="has no 'val/' folder"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "f")))
