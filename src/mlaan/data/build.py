"""Building a data set's splits from its registry entry, and downloading one into a data root."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from .registry import DatasetInfo, dataset_options, dataset_spec, downloadable_datasets


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    train_samples: int | None = None,
    test_samples: int | None = None,
    augment: bool = True,
    with_train: bool = True,
    **options: int,
) -> tuple[Any, Any, DatasetInfo]:
    """``(train_set, test_set, info)`` for data set ``name``.

    ``with_train=False`` skips the training split (``train_set`` is None, ``info.train_size`` 0): evaluation
    does not pay for scanning ImageNet's 1.28 M training files.

    ``root`` is the data root (``None``: the builder's default lookup); ``train_samples``/``test_samples`` keep
    the first N samples of each split. ``augment=False`` gives the training split the test transform.
    ``options``: data sets' own options as ``<dataset>_<option>`` (``synthetic_train_size=2048``,
    ``synthetic_test_size=512``, ``synthetic_image_size=32``); those of other data sets are ignored.
    Raises ValueError for unknown names or bad sizes, FileNotFoundError when the data are missing
    (the message says how to get them), ValueError for corrupt files.
    """
    spec = dataset_spec(name)
    for flag, value in (("train_samples", train_samples), ("test_samples", test_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    own = dataset_options(name, options)
    if spec.root == "unused":
        root, download = None, False
    elif spec.root == "required" and root is None:
        raise ValueError(f"dataset {name!r} needs --data-root ({spec.root_hint})")
    if download and not spec.downloadable:
        raise ValueError(f"dataset {name!r} cannot be downloaded; {spec.obtain}")
    with _removing_new_empty_folders(root) if download and root is not None else nullcontext():
        train_set, test_set, info = spec.builder(spec, root, download, augment, with_train, **own)
    train_set = _first(train_set, train_samples) if train_set is not None else None
    test_set = _first(test_set, test_samples)
    train_size = len(train_set) if train_set is not None else 0
    info = DatasetInfo(**{**info.to_dict(), "train_size": train_size, "test_size": len(test_set)})
    return train_set, test_set, info


def download_dataset(name: str, root: str | os.PathLike) -> Path:
    """Download ``name`` into ``root`` with torchvision (a data set whose entry is downloadable); returns the
    root."""
    spec = dataset_spec(name)
    if not spec.downloadable:
        raise ValueError(f"dataset {name!r} cannot be downloaded; downloadable: {', '.join(downloadable_datasets())}")
    build_datasets(name, root, download=True)
    return Path(root)


@contextmanager
def _removing_new_empty_folders(root: str | os.PathLike) -> Iterator[None]:
    """When the block fails (a download without network), remove the folders it created in ``root`` and up to it
    that are still empty, so that no empty ``data/`` is left behind to pass for a data root. Folders that existed
    before, and any that hold a file, stay."""
    root = Path(root).absolute()
    missing = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    before = set(os.listdir(root)) if root.is_dir() else set()
    try:
        yield
    except BaseException:
        new = sorted(set(os.listdir(root)) - before) if root.is_dir() else []
        for top in (root / name for name in new if not (root / name).is_symlink()):  # a link's target is not new
            for folder, _, _ in os.walk(top, topdown=False):  # inner folders first
                _remove_if_empty(Path(folder))
        for folder in missing:
            _remove_if_empty(folder)
        raise


def _remove_if_empty(folder: Path) -> None:
    """``rmdir`` ``folder``; one that is not empty (or not a folder) is left as it is."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _first(dataset: Any, n: int | None) -> Any:
    """The first ``n`` samples of ``dataset`` (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(dataset):
        return dataset
    from torch.utils.data import Subset

    return Subset(dataset, range(n))
