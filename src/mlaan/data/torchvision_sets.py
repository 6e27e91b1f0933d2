"""The data sets torchvision reads and downloads: CIFAR-10, CIFAR-100, SVHN, STL-10."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .registry import DatasetInfo, DatasetSpec, register
from .transforms import eval_transform, train_transform

# Per-channel statistics of each training set (pixel values in [0, 1]).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)


def download_failed(name: str, root: str | os.PathLike, err: BaseException) -> FileNotFoundError:
    """The one-line error for a download that could not be made: the data set, the root and what to do."""
    reason = " ".join(str(getattr(err, "reason", None) or err).split())
    return FileNotFoundError(
        f"{name} is not in {root} and could not be downloaded ({type(err).__name__}: {reason}); on a machine "
        f"with network run `mlaan download --dataset {name} --data-root DIR` and copy DIR to {root}"
    )


def _torchvision(make: Callable[[str, bool], Any], name: str, root: str | os.PathLike, download: bool) -> Any:
    """Call torchvision's constructor; turn its 'not found' RuntimeError into a FileNotFoundError, and a failed
    download (no network, a proxy, a server error) into one that says how to get the files another way."""
    try:
        return make(str(root), download)
    except RuntimeError as err:
        hint = "" if download else "; pass --download to fetch it"
        raise FileNotFoundError(f"{name} not found or corrupt under {root} ({err}){hint}") from err
    except OSError as err:  # urllib's URLError/HTTPError, socket timeouts, connection resets
        raise download_failed(name, root, err) from err


def _builder(class_name: str, pad: int, flip: bool, by_split: bool) -> Callable[..., tuple[Any, Any, DatasetInfo]]:
    """The builder of torchvision's ``class_name``: training crops of the ``pad``-padded image (and a horizontal
    flip when ``flip``); the splits chosen with ``split=`` one of the entry's ``splits`` when ``by_split`` (SVHN,
    STL-10), else with ``train=True|False`` (CIFAR)."""

    def build(spec: DatasetSpec, root: str | os.PathLike, download: bool, augment: bool, with_train: bool,
              ) -> tuple[Any, Any, DatasetInfo]:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, class_name)
        test_tf = eval_transform(spec.mean, spec.std)
        train_tf = train_transform(spec.image_size, pad, flip, spec.mean, spec.std) if augment else test_tf

        def make(split: int, transform: Callable) -> Any:
            chosen = {"split": spec.splits[split]} if by_split else {"train": split == 0}
            return _torchvision(lambda r, d: cls(r, download=d, transform=transform, **chosen), spec.name, root,
                                download)

        train = make(0, train_tf) if with_train else None
        test = make(1, test_tf)
        return train, test, spec.info(train, test, str(root))

    return build


_FETCH = "add --download to fetch it there"  # what a missing --data-root needs
register(DatasetSpec(
    "cifar10", "CIFAR-10, 10 classes, 3×32×32 (torchvision; --data-root, --download)",
    _builder("CIFAR10", pad=4, flip=True, by_split=False), num_classes=10, in_channels=3, image_size=32,
    mean=CIFAR10_MEAN, std=CIFAR10_STD, downloadable=True, root_hint=_FETCH,
))
register(DatasetSpec(
    "cifar100", "CIFAR-100, 100 classes, 3×32×32 (torchvision; --data-root, --download)",
    _builder("CIFAR100", pad=4, flip=True, by_split=False), num_classes=100, in_channels=3, image_size=32,
    mean=CIFAR100_MEAN, std=CIFAR100_STD, downloadable=True, root_hint=_FETCH,
))
register(DatasetSpec(
    "svhn", "SVHN, 10 classes, 3×32×32, crop pad 2, no flip (torchvision; --data-root, --download)",
    _builder("SVHN", pad=2, flip=False, by_split=True), num_classes=10, in_channels=3, image_size=32,
    mean=SVHN_MEAN, std=SVHN_STD, downloadable=True, root_hint=_FETCH, splits=("train", "test"),
))
register(DatasetSpec(
    "stl10", "STL-10, 10 classes, 3×96×96, crop pad 4 + flip (torchvision; --data-root, --download)",
    _builder("STL10", pad=4, flip=True, by_split=True), num_classes=10, in_channels=3, image_size=96,
    mean=STL10_MEAN, std=STL10_STD, downloadable=True, root_hint=_FETCH, splits=("train", "test"),
))
