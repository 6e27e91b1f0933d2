"""Data sets of ``mlaan train``: IDX errors, Fashion-MNIST lookup, transforms, synthetic, ImageFolder."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mlaan import data


def fake_fashion(folder, n_train=40, n_test=20, gz=True):
    """Four small IDX files in Fashion-MNIST's names; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    suffix = ".gz" if gz else ""
    for key, stem in data.FASHION_MNIST_FILES.items():
        data.write_idx(folder / f"{stem}{suffix}", arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = data.write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    good = data.write_idx(tmp_path / "x-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8))
    bad = tmp_path / "bad-idx3-ubyte.gz"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"bad-idx3-ubyte\.gz.*(corrupt|truncated)"):
        data.read_idx(bad)


def test_truncated_payload_is_a_clear_error(tmp_path):
    raw = tmp_path / "short-idx3-ubyte"
    data.write_idx(raw, np.zeros((10, 28, 28), np.uint8))
    raw.write_bytes(raw.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"short-idx3-ubyte.*truncated or corrupt"):
        data.read_idx(raw)
    gz = tmp_path / "short2-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))  # a valid gzip of a truncated IDX
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.read_idx(gz)


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"hello world, not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)


def test_fashion_mnist_from_a_data_root(tmp_path):
    arrays = fake_fashion(tmp_path / "fashion-mnist", gz=False)
    train, test, info = data.build_datasets("fashion-mnist", tmp_path)
    assert info.source == str(tmp_path / "fashion-mnist")
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 32)
    assert (len(train), len(test)) == (40, 20)
    image, label = test[3]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label == int(arrays["test_labels"][3])
    # the test image is the original, zero-padded by 2 and normalised
    expected = (torch.from_numpy(arrays["test_images"][3]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(image[0, 2:30, 2:30], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(image[0, 0, 0], torch.tensor(-0.2860 / 0.3530), atol=1e-5, rtol=0)
    # training samples are augmented (random crop of the padded image, flip): same shape, random
    torch.manual_seed(0)
    views = torch.stack([train[0][0] for _ in range(8)])
    assert views.shape == (8, 1, 32, 32)
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_torchvision_layout_and_subsets(tmp_path):
    fake_fashion(tmp_path / "FashionMNIST" / "raw", n_train=30, n_test=12)
    train, test, info = data.build_datasets("fashion-mnist", tmp_path, train_samples=10, test_samples=5)
    assert (len(train), len(test)) == (10, 5) and (info.train_size, info.test_size) == (10, 5)


def test_mismatched_label_count_is_an_error(tmp_path):
    fake_fashion(tmp_path)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="t10k-labels.*do not match 20 images"):
        data.build_datasets("fashion-mnist", tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*--download"):
        data.build_datasets("fashion-mnist", tmp_path / "empty")


@pytest.mark.skipif(not data.SYSTEM_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_system_fashion_mnist():
    train, test, info = data.build_datasets("fashion-mnist", None, test_samples=100)
    assert len(train) == 60000 and len(test) == 100
    labels = torch.tensor([test[i][1] for i in range(100)])
    assert labels.min() >= 0 and labels.max() <= 9


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist-x'; available: fashion-mnist, cifar10"):
        data.build_datasets("mnist-x")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_missing_torchvision_data_set(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=f"{name} not found.*--download"):
        data.build_datasets(name, tmp_path / "none")


def test_bad_sample_counts():
    with pytest.raises(ValueError, match="train_samples must be a positive integer"):
        data.build_datasets("synthetic", train_samples=0)
    with pytest.raises(ValueError, match="synthetic_image_size"):
        data.build_datasets("synthetic", synthetic_image_size=2)


def test_synthetic_is_deterministic_and_learnable():
    train, test, info = data.build_datasets("synthetic", synthetic_train_size=200, synthetic_test_size=50)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    assert (len(train), len(test)) == (200, 50)
    again = data.build_datasets("synthetic", synthetic_train_size=200, synthetic_test_size=50)[1]
    torch.testing.assert_close(test[7][0], again[7][0])
    # a nearest-class-mean classifier on raw pixels separates the classes: labels carry signal
    x, y = data.make_synthetic(500, seed=1)
    xt, yt = data.make_synthetic(200, seed=2)
    means = torch.stack([x[y == c].float().mean(0) for c in range(10)])
    pred = torch.cdist(xt.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_imagenet_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    train, test, info = data.build_datasets("imagenet", tmp_path)
    assert (info.num_classes, info.image_size, len(train), len(test)) == (2, 224, 4, 4)
    assert train[0][0].shape == (3, 224, 224) and test[3][1] == 1
    with pytest.raises(FileNotFoundError, match="no train/ or val/"):
        data.build_datasets("imagenet", tmp_path / "train")



@pytest.mark.parametrize("name", ["fashion-mnist", "synthetic"])
def test_evaluation_can_skip_the_training_split(name):
    if name == "fashion-mnist" and not data.SYSTEM_FASHION_MNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist not installed")
    train, test, info = data.build_datasets(name, None, with_train=False, test_samples=16)
    assert train is None and info.train_size == 0
    assert len(test) == info.test_size == 16


# ------------------------------------------------------------------------------------------------ registry
def test_registry_entries_hold_each_data_sets_facts():
    """What code asks instead of matching names: downloadable, data-root use, own options, splits, statistics."""
    assert data.downloadable_datasets() == ["fashion-mnist", "cifar10", "cifar100", "svhn", "stl10"]
    roots = {spec.name: spec.root for spec in data.registered_datasets()}
    assert roots == {"fashion-mnist": "optional", "cifar10": "required", "cifar100": "required", "svhn": "required",
                     "stl10": "required", "imagenet": "required", "synthetic": "unused"}
    assert data.dataset_spec("imagenet").splits == ("train", "val")
    assert data.dataset_spec("cifar10").mean == data.CIFAR10_MEAN and data.dataset_spec("stl10").image_size == 96
    assert data.data_option_keys() == ["synthetic_train_size", "synthetic_test_size", "synthetic_image_size"]
    assert data.data_option_keys("synthetic") == data.data_option_keys() and data.data_option_keys("cifar10") == []
    assert data.datasets_fitting(10, 1) == ["fashion-mnist"] and "cifar100" not in data.datasets_fitting(10, 3)
    assert data.datasets_fitting(100, 3) == ["cifar100", "imagenet"]  # an ImageFolder's classes: known once read


def test_a_data_set_is_taken_in_any_case_and_recorded_as_registered():
    # torchvision names its classes CIFAR10, SVHN, STL10: the run records (and names its folder by) ours
    from mlaan.training.config import TrainConfig

    assert data.check_dataset_name("CIFAR10") == "cifar10"
    assert data.check_dataset_name(" Fashion-MNIST") == "fashion-mnist"
    assert data.dataset_spec("SVHN").name == "svhn"
    cfg = TrainConfig(dataset="STL10", arch="resnet20").resolve()
    assert cfg.dataset == "stl10" and cfg.output_dir.startswith(str(Path("runs") / "stl10-"))
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar-10' \(did you mean 'cifar10'\?\)"):
        data.check_dataset_name("cifar-10")
    with pytest.raises(ValueError, match="unknown dataset 'mnist-x'; available: fashion-mnist"):
        data.dataset_spec("mnist-x")


def test_each_data_set_option_is_a_train_config_key_with_the_same_default():
    from mlaan.training.config import TrainConfig

    defaults = TrainConfig()
    for spec in data.registered_datasets():
        for option in spec.options:
            assert getattr(defaults, spec.option_key(option)) == option.default, spec.option_key(option)


def test_what_cannot_be_downloaded_or_lacks_a_root_is_refused_from_the_entry(tmp_path):
    with pytest.raises(ValueError, match="'imagenet' cannot be downloaded; downloadable: fashion-mnist, cifar10"):
        data.download_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="'synthetic' cannot be downloaded"):
        data.download_dataset("synthetic", tmp_path)
    with pytest.raises(ValueError, match=r"'imagenet' needs --data-root \(a folder with train/ and val/"):
        data.build_datasets("imagenet", None)
    with pytest.raises(ValueError, match="'imagenet' cannot be downloaded; point --data-root at train/ and val/"):
        data.build_datasets("imagenet", tmp_path, download=True)
    with pytest.raises(ValueError, match=r"'cifar10' needs --data-root \(add --download to fetch it there\)"):
        data.build_datasets("cifar10", None)
    with pytest.raises(ValueError, match="unknown data-set option"):
        data.build_datasets("synthetic", synthetic_colours=3)
    # another data set's options are ignored (the trainer passes every data set's), the chosen one's checked
    assert data.dataset_options("cifar10", {"synthetic_image_size": 2}) == {}
    with pytest.raises(ValueError, match="synthetic_image_size must be an integer >= 8, got 2"):
        data.dataset_options("synthetic", {"synthetic_image_size": 2})
    assert data.dataset_options("synthetic", {"synthetic_test_size": 8}) == {
        "train_size": 2048, "test_size": 8, "image_size": 32}


def test_check_data_root_asks_the_entry(tmp_path):
    from mlaan.training.safety import check_data_root

    check_data_root("synthetic", str(tmp_path / "nowhere"), download=False)  # generated: no root is read
    with pytest.raises(FileNotFoundError, match="data root .*nowhere does not exist"):
        check_data_root("cifar10", str(tmp_path / "nowhere"), download=False)
    assert data.dataset_folder("cifar10", tmp_path) == tmp_path
    fake_fashion(tmp_path / "FashionMNIST" / "raw", n_train=2, n_test=2)
    assert data.dataset_folder("fashion-mnist", tmp_path) == tmp_path / "FashionMNIST" / "raw"
    assert data.TensorImageDataset.__module__ == "mlaan.data.tensors"


# ----------------------------------------------------------------------------------------------- downloads
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-copy")


def test_a_failed_download_removes_the_empty_folders_it_made(no_network, tmp_path):
    """`mlaan train --dataset cifar10 --download` without network left an empty data/ behind."""
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        data.build_datasets("cifar10", tmp_path / "new" / "data", download=True)
    assert not (tmp_path / "new").exists()
    root = tmp_path / "mine"  # a root that was there: it stays, and so does everything it held
    (root / "old").mkdir(parents=True)
    (root / "notes.txt").write_text("kept")
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        data.download_dataset("fashion-mnist", root)  # torchvision made root/FashionMNIST/raw before failing
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "old"]


def test_a_failed_download_keeps_the_folders_it_wrote_files_in(tmp_path, monkeypatch):
    import torchvision.datasets

    def part_then_fail(root, download, **kwargs):
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True)
        (Path(root) / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"part")
        (Path(root) / "tmp" / "deeper").mkdir(parents=True)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", part_then_fail)
    with pytest.raises(FileNotFoundError, match="ConnectionResetError"):
        data.build_datasets("cifar10", tmp_path / "data", download=True)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar-10-batches-py"]
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"part"
