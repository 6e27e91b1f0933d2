"""Data sets for ``mlaan train``: a registry of entries with the paper's augmentations and normalisations.

``build_datasets(name, root, ...)`` returns ``(train_set, test_set, info)``; every sample is
``(normalised float image C×H×W, int label)``. The normalisation (``info.mean``/``info.std``) must also be
passed to the engine (``image_mean``/``image_std``) so that InfoPro can reconstruct the raw image.

One concern a module: :mod:`.registry` (the entries and every fact about a data set: classes, image size,
normalisation, whether it reads a data root or can be downloaded, its split names and own options),
:mod:`.build` (building and downloading from an entry), :mod:`.transforms` (augmentation and normalisation),
:mod:`.tensors` (in-memory image tensors), :mod:`.device` (batches made on the training device,
``--data-on-device``), and one module per source: :mod:`.fashion_mnist` (IDX files under
``--data-root`` or Debian's ``dataset-fashion-mnist``, zero-padded to 32×32), :mod:`.torchvision_sets`
(CIFAR-10/100, SVHN, STL-10), :mod:`.imagenet` (ImageFolders) and :mod:`.synthetic` (generated). Importing
this package imports neither torch nor torchvision; building a data set does.
"""

from __future__ import annotations

from pathlib import Path

from .registry import (
    DatasetInfo,
    DatasetOption,
    DatasetSpec,
    available_datasets,
    check_dataset_name,
    data_option_keys,
    dataset_folder,
    dataset_options,
    dataset_spec,
    datasets_fitting,
    describe_datasets,
    downloadable_datasets,
    register,
    registered_datasets,
)

# isort: split
# Each source registers its entries when imported, in this order (the order of help texts and error messages).
from .fashion_mnist import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_folder,
    load_fashion_mnist,
    read_idx,
    write_idx,
)

# isort: split
from .torchvision_sets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    STL10_MEAN,
    STL10_STD,
    SVHN_MEAN,
    SVHN_STD,
    download_failed,
)

# isort: split
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

# isort: split
from .synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic

# isort: split
from ..lazy import lazy_exports
from .build import build_datasets, download_dataset

# Debian's dataset-fashion-mnist folder. Fashion-MNIST's lookup reads it from here at each call, so setting
# ``mlaan.data.SYSTEM_FASHION_MNIST`` points it elsewhere.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STL10_MEAN",
    "STL10_STD",
    "SVHN_MEAN",
    "SVHN_STD",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "SYSTEM_FASHION_MNIST",
    "DatasetInfo",
    "DatasetOption",
    "DatasetSpec",
    "TensorImageDataset",
    "available_datasets",
    "build_datasets",
    "check_dataset_name",
    "data_option_keys",
    "dataset_folder",
    "dataset_options",
    "dataset_spec",
    "datasets_fitting",
    "describe_datasets",
    "download_dataset",
    "download_failed",
    "downloadable_datasets",
    "fashion_mnist_folder",
    "load_fashion_mnist",
    "make_synthetic",
    "read_idx",
    "register",
    "registered_datasets",
    "write_idx",
]


__getattr__ = lazy_exports(__name__, {"TensorImageDataset": "tensors"})
