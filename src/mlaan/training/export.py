"""Using a trained run's weights: exporting the plain backbone (``mlaan export``), loading a checkpoint's
backbone or whole :class:`~mlaan.LocalModel` (``mlaan eval``, :func:`mlaan.load_local_model`), and where its data
were read from.

An export is the plain backbone's ``state_dict`` alone (keys ``blocks.<i>.…``), with a ``.json`` file beside it
saying how to build the network. Errors are one-line ValueErrors (FileNotFoundError for a missing file) naming the
file, as in :mod:`mlaan.training.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save, atomic_write_text
from .checkpoint import (
    check_training_checkpoint,
    checkpoint_file,
    is_training_checkpoint,
    load,
    load_model_state,
    load_training_checkpoint,
    saved_config,
)
from .config import merge


def data_root_of(ckpt: Mapping[str, Any]) -> str | None:
    """Where a run's data were actually read from (a Debian folder rather than the default ``data``, say),
    falling back to its configured data root for checkpoints that do not say."""
    source = ckpt.get("data_source")
    if source and Path(source).is_dir():
        return str(source)
    return configured_data_root(ckpt)


def configured_data_root(ckpt: Mapping[str, Any]) -> str | None:
    """The data root a run was configured with (its ``data_root`` option; None when it had none)."""
    return ckpt.get("config", {}).get("data_root")


def default_data_root(meta: Mapping[str, Any], dataset: str) -> str:
    """The data folder ``mlaan eval``/``export`` read ``dataset`` from when not given ``--data-root``, for a
    checkpoint or export described by ``meta`` (:func:`load_backbone`): for the run's own data set, where its files
    were found (``data_root``); for another, the data root the run was configured with (``configured_data_root``),
    never the folder the run's own data set was found in (Debian's Fashion-MNIST folder, say). ``data`` when the
    run had none."""
    if dataset == meta["dataset"]:
        return meta.get("data_root") or "data"
    if "configured_data_root" in meta:
        return meta["configured_data_root"] or "data"
    # an export written before configured_data_root: its data_root is the configured one unless the run's data set
    # locates its files elsewhere
    from ..data import available_datasets, dataset_spec

    located = meta["dataset"] in available_datasets() and dataset_spec(meta["dataset"]).locate is not None
    return (None if located else meta.get("data_root")) or "data"


def data_options_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The options of its own data set that a run read (``synthetic_train_size``, ...; none for most data sets),
    as its checkpoint's config saved them or, for one saved before the option existed, the default."""
    from ..data import data_option_keys

    config = merge(saved_config(ckpt))
    return {key: getattr(config, key) for key in data_option_keys(ckpt["dataset"])}


def local_model_from_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> Any:
    """The whole :class:`~mlaan.LocalModel` (backbone, aux nets, EMA twins) of a training checkpoint, built
    with the run's options and loaded with its weights. ValueError when the weights do not fit."""
    from .. import create_local_model

    config = merge(saved_config(ckpt))
    model = create_local_model(
        ckpt["arch"], method=ckpt["method"], num_local_modules=ckpt["local_modules"],
        num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"], image_size=ckpt["image_size"],
        **config.engine_options(tuple(ckpt["mean"]), tuple(ckpt["std"])),
    )
    load_model_state(model, ckpt["model"], path, whose="its own model")
    return model


def load_local_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The whole :class:`~mlaan.LocalModel` of a ``mlaan train`` checkpoint (``last.pt`` / ``best.pt``, or a run
    folder for its ``last.pt``): backbone,
    aux nets and EMA twins, built with the run's options and holding its weights, on ``map_location``, in
    train mode. ValueError (one line) for a file that is not a training checkpoint (an export holds the backbone
    alone: load it with ``mlaan.models.create``) or whose weights do not fit."""
    path = checkpoint_file(path)
    ckpt = load_training_checkpoint(path, map_location)
    return local_model_from_checkpoint(ckpt, path).to(map_location)


def backbone_state(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The plain backbone's ``state_dict`` (keys ``blocks.<i>.…``) inside a training checkpoint's model state."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def load_backbone(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state_dict, description) from a training checkpoint, or from an export and the ``.json`` beside it
    (what ``mlaan eval`` evaluates). The description has ``arch``, ``num_classes``, ``in_channels``,
    ``image_size``, ``dataset``, ``data_root``, ``configured_data_root`` (missing in exports written before it)
    and ``data_options``, and for a training checkpoint the run's ``precise_bn``, ``batch_size``, ``seed`` and
    ``step`` (how its evaluation was made). FileNotFoundError / ValueError (one line, naming the file) when it is
    neither, or damaged. A run folder stands for its ``last.pt``."""
    path = checkpoint_file(path)
    obj = load(path)
    if is_training_checkpoint(obj):
        check_training_checkpoint(obj, path)  # every field there and of the right kind
        return backbone_state(obj), describe_training_checkpoint(obj)
    meta_path = Path(path).with_suffix(".json")
    if not isinstance(obj, dict) or not meta_path.is_file():
        raise ValueError(f"{path} is neither a training checkpoint nor an export with {meta_path} beside it")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "mlaan-backbone":
        raise ValueError(f"{meta_path} is not an mlaan export description")
    return obj, meta


def describe_training_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`load_backbone` says of a (checked) training checkpoint: how to build its backbone, its data set,
    and how its evaluation was made."""
    meta = {k: ckpt[k] for k in ("arch", "num_classes", "in_channels", "image_size", "dataset", "method",
                                 "local_modules", "step")}
    config = merge(saved_config(ckpt))
    meta.update(data_root=data_root_of(ckpt), configured_data_root=configured_data_root(ckpt),
                data_options=data_options_of(ckpt), precise_bn=config.precise_bn, batch_size=config.batch_size,
                seed=config.seed)
    return meta


def _check_export_target(out: Path, meta_path: Path) -> None:
    """An export replaces only an earlier export: never a training checkpoint, a run's ``metrics.json`` or any
    other file that happens to sit at ``out`` or ``out.json`` (ValueError naming it)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.pt'}")
    if out == meta_path:
        raise ValueError(f"--out {out} ends in .json, the name of the description written beside the weights; "
                         "use e.g. .pt")
    earlier_export = False
    if meta_path.exists():
        try:
            earlier_export = json.loads(meta_path.read_text()).get("format") == "mlaan-backbone"
        except (OSError, ValueError, AttributeError):
            earlier_export = False
        if not earlier_export:
            raise ValueError(f"--out {out}: {meta_path} exists and is not an mlaan export description (a run's "
                             "results?); it is not replaced: choose another --out")
    if out.exists() and not earlier_export:
        raise ValueError(f"--out {out} exists and is not an earlier mlaan export (a training checkpoint?); it is "
                         "not replaced: choose another --out")


def holds_best(ckpt: Mapping[str, Any]) -> bool:
    """Whether a training checkpoint's weights are the ones whose evaluation reached the run's best accuracy:
    saved at the best evaluation's step. Checkpoints written before ``best_step`` was recorded: saved at the end
    of the best epoch."""
    if ckpt.get("best_step", -1) >= 0:
        return ckpt.get("step") == ckpt["best_step"]
    return ckpt.get("epoch") == ckpt.get("best_epoch") and not ckpt.get("epoch_step")


def export_backbone(ckpt: Mapping[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the plain backbone's state_dict to ``out`` and its build recipe to ``out`` with ``.json``; returns
    both paths. ValueError when the checkpoint holds no backbone, or ``out`` or ``out.json`` is a file other than
    an earlier export (a training checkpoint, a run's metrics.json); FileNotFoundError when ``out``'s folder does
    not exist."""
    state = {k: v.detach().clone() for k, v in backbone_state(ckpt).items()}
    if not state:
        raise ValueError("checkpoint holds no backbone weights (no 'backbone.' keys in its model state)")
    load_with = (f"mlaan.models.create({ckpt['arch']!r}, num_classes={ckpt['num_classes']}, "
                 f"in_channels={ckpt['in_channels']}, image_size={ckpt['image_size']})")
    if ":" in ckpt["arch"]:  # torchvision:NAME / timm:NAME: the library class's own keys, loadable into it
        from .. import models

        with torch.device("meta"):
            backbone = models.create(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"])
        state = backbone.export_state_dict(state)
        load_with += ".source"
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"folder {out.parent} for --out does not exist")
    meta_path = out.with_suffix(".json")
    _check_export_target(out, meta_path)
    meta = {
        "format": "mlaan-backbone",
        "arch": ckpt["arch"],
        "num_classes": ckpt["num_classes"],
        "in_channels": ckpt["in_channels"],
        "image_size": ckpt["image_size"],
        "mean": list(ckpt["mean"]),
        "std": list(ckpt["std"]),
        "dataset": ckpt["dataset"],
        "data_root": data_root_of(ckpt),
        "configured_data_root": configured_data_root(ckpt),
        "data_options": data_options_of(ckpt),
        "trained_with": {"method": ckpt["method"], "local_modules": ckpt["local_modules"]},
        "epoch": ckpt.get("epoch"),  # epochs completed when these weights were saved
        "step": ckpt.get("step"),
        "best_accuracy": ckpt.get("best_accuracy"),  # the run's best test accuracy, reached at best_epoch
        "best_epoch": ckpt.get("best_epoch"),
        "is_best": holds_best(ckpt),
        "load_with": f"{load_with}.load_state_dict(torch.load({out.name!r}, weights_only=True))",
    }
    atomic_save(state, out)
    atomic_write_text(json.dumps(meta, indent=2) + "\n", meta_path)
    return out, meta_path
