"""The data sets ``mlaan train`` knows and every fact about each, in its registry entry (:class:`DatasetSpec`).

Whether it can be downloaded, whether it reads a data root, its own options, its split names, normalisation,
image size and classes are asked of the entry; no code outside the entry's module matches a data set by name.
This module imports neither torch nor torchvision (``mlaan --help`` lists the data sets from it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..names import registered_spelling, unknown

RootUse = Literal["required", "optional", "unused"]


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
        """The fields as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class DatasetOption:
    """An option of one data set: an integer ``name`` (at least ``minimum``), given to :func:`build_datasets` and
    ``mlaan train`` as ``<dataset>_<name>`` (``synthetic_train_size``, flag ``--synthetic-train-size``)."""

    name: str
    default: int
    help: str
    metavar: str = "N"
    minimum: int = 1


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: how to build a data set and every fact about it.

    ``builder(spec, root, download, augment, with_train, **options)`` returns ``(train_set or None, test_set,
    DatasetInfo)``; ``options`` are the entry's own (:attr:`options`, by their short names), already checked.
    ``root``: whether it reads ``--data-root`` (``"optional"``: it also looks in a default place without one;
    ``"unused"``: generated data); ``root_hint`` says what the root must hold when it is missing.
    ``downloadable``: ``--download`` fetches it; otherwise ``obtain`` says how to get it. ``num_classes`` None:
    read from the data (ImageFolder's class folders). ``locate(root)``: the folder its files are read from.
    """

    name: str
    description: str  # one line, for help texts
    builder: Callable[..., tuple[Any, Any, DatasetInfo]]
    num_classes: int | None
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    downloadable: bool = False
    root: RootUse = "required"
    root_hint: str = ""
    obtain: str = ""
    splits: tuple[str, str] = ("train", "test")  # names of the training and the test split
    options: tuple[DatasetOption, ...] = ()
    locate: Callable[[str | os.PathLike], Path | None] | None = field(default=None, compare=False)

    def option_key(self, option: DatasetOption) -> str:
        """The keyword, config key and flag name (with underscores) of one of this data set's options."""
        return f"{self.name}_{option.name}".replace("-", "_")

    def info(self, train: Any, test: Any, source: str, **facts: Any) -> DatasetInfo:
        """The :class:`DatasetInfo` of built splits (``train`` may be None); ``facts`` override the entry's."""
        values = {"num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size,
                  "mean": self.mean, "std": self.std, **facts}
        train_size = 0 if train is None else len(train)
        return DatasetInfo(self.name, values["num_classes"], values["in_channels"], values["image_size"],
                           values["mean"], values["std"], train_size, len(test), source)


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` under ``spec.name`` (ValueError when the name is taken by another entry)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name].builder is not spec.builder:
        raise ValueError(f"dataset name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def available_datasets() -> list[str]:
    """Names accepted by :func:`build_datasets`."""
    return list(_REGISTRY)


def registered_datasets() -> list[DatasetSpec]:
    """Every registry entry, in listing order."""
    return list(_REGISTRY.values())


def describe_datasets() -> dict[str, str]:
    """Name → one-line description, for help texts."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def check_dataset_name(name: str) -> str:
    """The registered spelling of data set ``name``, given in any case (``CIFAR10``, as torchvision's class is
    named, → ``cifar10``); ValueError naming the known data sets (and the closest) when it is none of them."""
    registered = registered_spelling(name, _REGISTRY)
    if registered is None:
        raise ValueError(unknown("dataset", name, available_datasets()))
    return registered


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``, in any case (ValueError for unknown names, as :func:`check_dataset_name`)."""
    return _REGISTRY[check_dataset_name(name)]


def downloadable_datasets() -> list[str]:
    """Names that ``--download`` / ``mlaan download`` can fetch."""
    return [name for name, spec in _REGISTRY.items() if spec.downloadable]


def data_option_keys(name: str | None = None) -> list[str]:
    """Every data set's own options as keywords / config keys (``synthetic_train_size``, ...); with ``name``, only
    those data set ``name`` reads (none when no entry has that name: a run of a data set that only a script
    registered reads no option of ``mlaan train``'s)."""
    specs = _REGISTRY.values() if name is None else [_REGISTRY[name]] if name in _REGISTRY else []
    return [spec.option_key(option) for spec in specs for option in spec.options]


def datasets_fitting(num_classes: int, in_channels: int) -> list[str]:
    """Names of the data sets whose images have ``in_channels`` channels and whose class count is ``num_classes``
    or known only once read (ImageFolders): those a network built for them can be evaluated on."""
    return [name for name, spec in _REGISTRY.items()
            if spec.in_channels == in_channels and spec.num_classes in (None, num_classes)]


def dataset_options(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of data set ``name`` taken from ``values`` (keyed ``<dataset>_<option>``; missing ones get
    their defaults), checked, by short name. Keys of other data sets' options are ignored; a key that is no
    data set's option is a ValueError, as is a value that is not an integer at least the option's minimum."""
    unknown = sorted(set(values) - set(data_option_keys()))
    if unknown:
        raise ValueError(f"unknown data-set option(s) {', '.join(unknown)}; known: {', '.join(data_option_keys())}")
    spec = dataset_spec(name)
    chosen = {}
    for option in spec.options:
        key = spec.option_key(option)
        value = values.get(key, option.default)
        if isinstance(value, bool) or not isinstance(value, int) or value < option.minimum:
            raise ValueError(f"{key} must be an integer >= {option.minimum}, got {value!r}")
        chosen[option.name] = value
    return chosen


def dataset_folder(name: str, root: str | os.PathLike) -> Path | str | os.PathLike | None:
    """Where the files of data set ``name`` are read from with data root ``root`` (``root`` itself unless the
    entry locates them, as Fashion-MNIST does in the layouts it accepts)."""
    spec = dataset_spec(name)
    return spec.locate(root) if spec.locate is not None else root
