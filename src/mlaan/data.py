"""Data sets for ``mlaan train``: a registry of builders with the paper's augmentations and normalisations.

``build_datasets(name, root, ...)`` returns ``(train_set, test_set, info)``; every sample is
``(normalised float image C×H×W, int label)``. The normalisation (``info.mean``/``info.std``) must also be
passed to the engine (``image_mean``/``image_std``) so that InfoPro can reconstruct the raw image.

Fashion-MNIST is read straight from its IDX files (``*-idx3-ubyte[.gz]``), found under ``--data-root`` or in
Debian's ``dataset-fashion-mnist`` folder (``/usr/share/datasets/fashion-mnist``). Its 28×28 images are
**zero-padded by 2 pixels to 32×32** (the background is black, so the pad is invisible) so that the CIFAR
ResNets see their usual input size; training adds a random 32×32 crop of the 4-pixel zero-padded image and a
horizontal flip.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Per-channel statistics of each training set (pixel values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the engine need to know about a data set."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    source: str  # where the data were read from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    description: str
    builder: Callable[..., tuple[Dataset, Dataset, DatasetInfo]]


_REGISTRY: dict[str, _Entry] = {}
_DOWNLOADABLE = ("fashion-mnist", "cifar10", "cifar100", "svhn", "stl10")


def _register(name: str, description: str):
    def wrap(fn):
        _REGISTRY[name] = _Entry(description, fn)
        return fn

    return wrap


def available_datasets() -> list[str]:
    """Names accepted by :func:`build_datasets`."""
    return list(_REGISTRY)


def describe_datasets() -> dict[str, str]:
    """Name → one-line description, for help texts."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def check_dataset_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    train_samples: int | None = None,
    test_samples: int | None = None,
    augment: bool = True,
    synthetic_train_size: int = 2048,
    synthetic_test_size: int = 512,
    synthetic_image_size: int = 32,
    with_train: bool = True,
) -> tuple[Dataset | None, Dataset, DatasetInfo]:
    """``(train_set, test_set, info)`` for data set ``name``.

    ``with_train=False`` skips the training split (``train_set`` is None, ``info.train_size`` 0): evaluation
    does not pay for scanning ImageNet's 1.28 M training files.

    ``root`` is the data root (``None``: the builder's default lookup); ``train_samples``/``test_samples`` keep
    the first N samples of each split. ``augment=False`` gives the training split the test transform.
    Raises ValueError for unknown names or bad sizes, FileNotFoundError when the data are missing
    (the message says how to get them), ValueError for corrupt files.
    """
    check_dataset_name(name)
    for flag, value in (("train_samples", train_samples), ("test_samples", test_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    kwargs: dict = {"root": root, "download": download, "augment": augment, "with_train": with_train}
    if name == "synthetic":
        kwargs = {
            "augment": augment,
            "with_train": with_train,
            "train_size": synthetic_train_size,
            "test_size": synthetic_test_size,
            "image_size": synthetic_image_size,
        }
    train_set, test_set, info = _REGISTRY[name].builder(**kwargs)
    train_set = _first(train_set, train_samples) if train_set is not None else None
    test_set = _first(test_set, test_samples)
    train_size = len(train_set) if train_set is not None else 0
    info = DatasetInfo(**{**info.to_dict(), "train_size": train_size, "test_size": len(test_set)})
    return train_set, test_set, info


def download_dataset(name: str, root: str | os.PathLike) -> Path:
    """Download ``name`` into ``root`` with torchvision (not for ``imagenet``/``synthetic``); returns the root."""
    check_dataset_name(name)
    if name in ("imagenet", "synthetic"):
        raise ValueError(f"dataset {name!r} cannot be downloaded; downloadable: {', '.join(_DOWNLOADABLE)}")
    build_datasets(name, root, download=True)
    return Path(root)


def _size(dataset: Dataset | None) -> int:
    return 0 if dataset is None else len(dataset)


def _first(dataset: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, range(n))


# ----------------------------------------------------------------------------------------------- transforms
def _train_transform(size: int, pad: int, flip: bool, mean, std, padding_mode: str = "reflect"):
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomCrop(size, padding=pad, padding_mode=padding_mode)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def _test_transform(mean, std, resize: int | None = None, crop: int | None = None):
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if resize is not None:
        steps.append(v2.Resize(resize, antialias=True))
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor N×C×H×W, labels as int64; ``transform`` maps a uint8 C×H×W
    tensor to the model's input."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N×C×H×W tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# ------------------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Raises ValueError naming the file when it is truncated, not gzip when it says so, or not an IDX file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err}); delete it and get it again") from err
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {shape} ({expected} bytes of data) but the file holds {len(data) - header}; "
            "it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file, gzipped when ``path`` ends in ``.gz`` (for tests and subsets)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_folder(root: str | os.PathLike | None) -> Path | None:
    """The first folder holding all four Fashion-MNIST IDX files: ``root``, ``root/fashion-mnist``,
    ``root/FashionMNIST/raw`` (torchvision's layout), then the Debian package's folder."""
    candidates = []
    if root is not None:
        r = Path(root)
        candidates += [r, r / "fashion-mnist", r / "FashionMNIST" / "raw"]
    candidates.append(SYSTEM_FASHION_MNIST)
    for folder in candidates:
        if all(_find_idx(folder, stem) for stem in FASHION_MNIST_FILES.values()):
            return folder
    return None


def load_fashion_mnist(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The four arrays of Fashion-MNIST as tensors: images N×1×28×28 uint8, labels N int64 (checked)."""
    folder = Path(folder)
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise FileNotFoundError(f"{folder}: missing {stem}[.gz]")
        arrays[key] = (read_idx(path), path)
    out = {}
    for split in ("train", "test"):
        (images, ipath), (labels, lpath) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{ipath}: expected N×28×28 images, got shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{lpath}: {labels.shape} labels do not match {len(images)} images in {ipath}")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lpath}: label {int(labels.max())} out of range 0–9")
        out[f"{split}_images"] = torch.from_numpy(images.copy()).unsqueeze(1)
        out[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return out


@_register("fashion-mnist", "Fashion-MNIST, 10 classes, 1×28×28 zero-padded to 32×32 (default; Debian or --download)")
def _fashion_mnist(root, download: bool, augment: bool, with_train: bool = True):
    folder = fashion_mnist_folder(root)
    if folder is None and download:
        if root is None:
            raise ValueError("--download needs a --data-root to download Fashion-MNIST into")
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except (OSError, RuntimeError) as err:  # torchvision says RuntimeError when every mirror failed
            raise download_failed("fashion-mnist", root, err) from err
        folder = fashion_mnist_folder(root)
    if folder is None:
        where = f"{root} (nor {root}/fashion-mnist, {root}/FashionMNIST/raw)" if root is not None else "no data root"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {where} nor in {SYSTEM_FASHION_MNIST}; "
            "install Debian's dataset-fashion-mnist or pass --download with a --data-root"
        )
    arrays = load_fashion_mnist(folder)
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from torchvision.transforms import v2

    pad_to_32 = v2.Pad(2)
    train_tf = v2.Compose([pad_to_32, _train_transform(32, 4, True, mean, std, padding_mode="constant")])
    test_tf = v2.Compose([pad_to_32, _test_transform(mean, std)])
    train = (TensorImageDataset(arrays["train_images"], arrays["train_labels"], train_tf if augment else test_tf)
             if with_train else None)
    test = TensorImageDataset(arrays["test_images"], arrays["test_labels"], test_tf)
    info = DatasetInfo("fashion-mnist", 10, 1, 32, mean, std, _size(train), len(test), str(folder))
    return train, test, info


# -------------------------------------------------------------------------------------- torchvision sets
def _torchvision(make: Callable, name: str, root, download: bool):
    """Call torchvision's constructor; turn its 'not found' RuntimeError into a FileNotFoundError, and a failed
    download (no network, a proxy, a server error) into one that says how to get the files another way."""
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root (add --download to fetch it there)")
    try:
        return make(str(root), download)
    except RuntimeError as err:
        hint = "" if download else "; pass --download to fetch it"
        raise FileNotFoundError(f"{name} not found or corrupt under {root} ({err}){hint}") from err
    except OSError as err:  # urllib's URLError/HTTPError, socket timeouts, connection resets
        raise download_failed(name, root, err) from err


def download_failed(name: str, root: str | os.PathLike, err: BaseException) -> FileNotFoundError:
    """The one-line error for a download that could not be made: the data set, the root and what to do."""
    reason = " ".join(str(getattr(err, "reason", None) or err).split())
    return FileNotFoundError(
        f"{name} is not in {root} and could not be downloaded ({type(err).__name__}: {reason}); on a machine "
        f"with network run `mlaan download --dataset {name} --data-root DIR` and copy DIR to {root}"
    )


@_register("cifar10", "CIFAR-10, 10 classes, 3×32×32 (torchvision; --data-root, --download)")
def _cifar10(root, download: bool, augment: bool, with_train: bool = True):
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "cifar10", 10, CIFAR10_MEAN, CIFAR10_STD, root, download, augment, with_train)


@_register("cifar100", "CIFAR-100, 100 classes, 3×32×32 (torchvision; --data-root, --download)")
def _cifar100(root, download: bool, augment: bool, with_train: bool = True):
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "cifar100", 100, CIFAR100_MEAN, CIFAR100_STD, root, download, augment, with_train)


def _cifar(cls, name, classes, mean, std, root, download, augment, with_train):
    test_tf = _test_transform(mean, std)
    train_tf = _train_transform(32, 4, True, mean, std) if augment else test_tf
    train = (_torchvision(lambda r, d: cls(r, train=True, download=d, transform=train_tf), name, root, download)
             if with_train else None)
    test = _torchvision(lambda r, d: cls(r, train=False, download=d, transform=test_tf), name, root, download)
    return train, test, DatasetInfo(name, classes, 3, 32, mean, std, _size(train), len(test), str(root))


@_register("svhn", "SVHN, 10 classes, 3×32×32, crop pad 2, no flip (torchvision; --data-root, --download)")
def _svhn(root, download: bool, augment: bool, with_train: bool = True):
    from torchvision.datasets import SVHN

    return _split_style(SVHN, "svhn", 32, 2, False, SVHN_MEAN, SVHN_STD, root, download, augment, with_train)


@_register("stl10", "STL-10, 10 classes, 3×96×96, crop pad 4 + flip (torchvision; --data-root, --download)")
def _stl10(root, download: bool, augment: bool, with_train: bool = True):
    from torchvision.datasets import STL10

    return _split_style(STL10, "stl10", 96, 4, True, STL10_MEAN, STL10_STD, root, download, augment, with_train)


def _split_style(cls, name, size, pad, flip, mean, std, root, download, augment, with_train):
    """A torchvision data set chosen with ``split="train"|"test"`` (SVHN, STL-10), 10 classes, 3 channels."""
    test_tf = _test_transform(mean, std)
    train_tf = _train_transform(size, pad, flip, mean, std) if augment else test_tf
    train = (_torchvision(lambda r, d: cls(r, split="train", download=d, transform=train_tf), name, root, download)
             if with_train else None)
    test = _torchvision(lambda r, d: cls(r, split="test", download=d, transform=test_tf), name, root, download)
    return train, test, DatasetInfo(name, 10, 3, size, mean, std, _size(train), len(test), str(root))


@_register("imagenet", "ImageNet as an ImageFolder with train/ and val/ (--data-root), 224×224")
def _imagenet(root, download: bool, augment: bool, with_train: bool = True):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    if root is None:
        raise ValueError("dataset 'imagenet' needs --data-root (a folder with train/ and val/ class folders)")
    if download:
        raise ValueError("dataset 'imagenet' cannot be downloaded; point --data-root at train/ and val/ folders")
    missing = [s for s in ("train", "val") if not (Path(root) / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"imagenet: {root} has no {' or '.join(f'{m}/' for m in missing)} folder")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    test_tf = _test_transform(mean, std, resize=256, crop=224)
    train_tf = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    test = ImageFolder(str(Path(root) / "val"), transform=test_tf)
    # the class list is the train/ folder's subfolders: comparing names needs no scan of the images
    train_classes = sorted(e.name for e in os.scandir(Path(root) / "train") if e.is_dir())
    if train_classes != test.classes:
        raise ValueError(f"imagenet: train/ has {len(train_classes)} classes but val/ has {len(test.classes)}")
    train = ImageFolder(str(Path(root) / "train"), transform=train_tf if augment else test_tf) if with_train else None
    info = DatasetInfo("imagenet", len(test.classes), 3, 224, mean, std, _size(train), len(test), str(root))
    return train, test, info


# ------------------------------------------------------------------------------------------------ synthetic
def make_synthetic(
    size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random 3×S×S uint8 images whose class is learnable: each class has a fixed random coarse
    pattern, each image is that pattern plus per-pixel noise. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(1234)  # the class patterns are the same for every split
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="nearest")
    g.manual_seed(seed)
    labels = torch.randint(0, num_classes, (size,), generator=g)
    noise = torch.rand(size, 3, image_size, image_size, generator=g)
    images = (0.5 * patterns[labels] + 0.5 * noise).mul(255).round().to(torch.uint8)
    return images, labels


@_register("synthetic", "random 3×32×32 images, 10 classes, for smoke and memory runs (--synthetic-* sizes)")
def _synthetic(augment: bool, train_size: int, test_size: int, image_size: int, with_train: bool = True):
    for flag, value, low in (
        ("synthetic_train_size", train_size, 1),
        ("synthetic_test_size", test_size, 1),
        ("synthetic_image_size", image_size, 8),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
    mean, std = SYNTHETIC_MEAN, SYNTHETIC_STD
    test_tf = _test_transform(mean, std)
    train_tf = _train_transform(image_size, 4, True, mean, std) if augment else test_tf
    train = None
    if with_train:
        train = TensorImageDataset(*make_synthetic(train_size, image_size, seed=1), transform=train_tf)
    test = TensorImageDataset(*make_synthetic(test_size, image_size, seed=2), transform=test_tf)
    info = DatasetInfo("synthetic", 10, 3, image_size, mean, std, _size(train), len(test), "generated")
    return train, test, info
