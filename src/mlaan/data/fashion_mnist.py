"""Fashion-MNIST, read straight from its IDX files (``*-idx3-ubyte[.gz]``) under ``--data-root`` or in Debian's
``dataset-fashion-mnist`` folder (``mlaan.data.SYSTEM_FASHION_MNIST``).

Its 28×28 images are **zero-padded by 2 pixels to 32×32** (the background is black, so the pad is invisible) so
that the CIFAR ResNets see their usual input size; training adds a random 32×32 crop of the 4-pixel zero-padded
image and a horizontal flip.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import DatasetInfo, DatasetSpec, register
from .transforms import ImageTransform

if TYPE_CHECKING:
    import numpy as np
    import torch

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Per-channel statistics of the training set (pixel values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def system_folder() -> Path:
    """Debian's ``dataset-fashion-mnist`` folder: ``mlaan.data.SYSTEM_FASHION_MNIST``, read at each call (so that
    setting that attribute points the lookup elsewhere)."""
    from .. import data

    return Path(data.SYSTEM_FASHION_MNIST)


# ----------------------------------------------------------------------------------------------------- IDX
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Raises ValueError naming the file when it is truncated, not gzip when it says so, or not an IDX file.
    """
    import numpy as np

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
    import numpy as np

    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------- the four files
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
    candidates.append(system_folder())
    for folder in candidates:
        if all(_find_idx(folder, stem) for stem in FASHION_MNIST_FILES.values()):
            return folder
    return None


def load_fashion_mnist(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The four arrays of Fashion-MNIST as tensors: images N×1×28×28 uint8, labels N int64 (checked)."""
    import numpy as np
    import torch

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


# ----------------------------------------------------------------------------------------------- the entry
def _build(
    spec: DatasetSpec, root: str | os.PathLike | None, download: bool, augment: bool, with_train: bool
) -> tuple[Any, Any, DatasetInfo]:
    folder = fashion_mnist_folder(root)
    if folder is None and download:
        if root is None:
            raise ValueError("--download needs a --data-root to download Fashion-MNIST into")
        from torchvision.datasets import FashionMNIST

        from .torchvision_sets import download_failed

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except (OSError, RuntimeError) as err:  # torchvision says RuntimeError when every mirror failed
            raise download_failed(spec.name, root, err) from err
        folder = fashion_mnist_folder(root)
    if folder is None:
        where = f"{root} (nor {root}/fashion-mnist, {root}/FashionMNIST/raw)" if root is not None else "no data root"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {where} nor in {system_folder()}; "
            "install Debian's dataset-fashion-mnist or pass --download with a --data-root"
        )
    arrays = load_fashion_mnist(folder)
    from .tensors import TensorImageDataset

    test_tf = ImageTransform(spec.mean, spec.std, pre_pad=2)  # 28 → 32 with black, the background's colour
    train_tf = dataclasses.replace(test_tf, crop=32, crop_pad=4, padding_mode="constant", flip=True)
    train = (TensorImageDataset(arrays["train_images"], arrays["train_labels"], train_tf if augment else test_tf)
             if with_train else None)
    test = TensorImageDataset(arrays["test_images"], arrays["test_labels"], test_tf)
    return train, test, spec.info(train, test, str(folder))


register(DatasetSpec(
    name="fashion-mnist",
    description="Fashion-MNIST, 10 classes, 1×28×28 zero-padded to 32×32 (default; Debian or --download)",
    builder=_build, num_classes=10, in_channels=1, image_size=32, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
    downloadable=True, root="optional", locate=fashion_mnist_folder,
))
