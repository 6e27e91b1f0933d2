"""Checkpoints: only tensors and plain data, written atomically, read with ``weights_only=True``.

A training checkpoint (``last.pt``/``best.pt``) is a dict::

    {"format": "mlaan-checkpoint", "version": 1,
     "arch", "method", "local_modules", "dataset", "num_classes", "in_channels", "image_size", "mean", "std",
     "model": LocalModel.state_dict() (backbone, aux nets, EMA twins), "optimizer", "scheduler",
     "epoch": completed epochs, "epoch_step": steps done in the epoch after those, "step": optimizer steps,
     "best_accuracy", "best_epoch", "config": TrainConfig.to_dict(), "rng": {...tensors...}}

An export (``mlaan export``) is the plain backbone's ``state_dict`` alone (keys ``blocks.<i>.…``), with a
``.json`` file beside it saying how to build the network.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "mlaan-checkpoint"
VERSION = 1
IDENTITY_KEYS = ("arch", "method", "local_modules")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flush + fsync, then ``os.replace``: a reader
    sees the old file or the new one, never half of one."""

    def write(f) -> None:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            # torch's zip writer turns a failed write (disk full, file too large) into an obscure
            # RuntimeError: report the OSError underneath instead
            if recorder.error is not None:
                raise recorder.error from None
            raise
        if recorder.error is not None:  # a failed write that torch did not report: never rename it
            raise recorder.error

    _atomic_write(path, "wb", write)


def _atomic_write(path: str | os.PathLike, mode: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, flush, fsync, rename over ``path``, fsync the
    folder; the temporary file is removed if anything fails, so ``path`` stays the previous good file."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _WriteRecorder:
    """A file's ``write`` for ``torch.save`` that remembers the first OSError it raised."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Same guarantee for a text file (metrics.json, export metadata)."""
    _atomic_write(path, "w", lambda f: f.write(text))


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file in ``path``'s folder (so ``os.replace`` is atomic), with the permissions a plain
    ``open`` would give (mkstemp makes it private)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; FileNotFoundError / ValueError with the path on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle / zip errors differ between versions: report them all the same way
        code = re.search(r"GLOBAL ([\w.]+)", str(err))
        if code is not None:  # a pickled callable or class: refused, never called
            raise ValueError(
                f"{path} is refused: it holds {code.group(1)}, not only tensors and plain data "
                "(checkpoints are read with torch.load(weights_only=True), which never runs code from a file)"
            ) from err
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err


def _check_archive(path: Path) -> None:
    """torch.load does not check the CRC-32s of its zip archive, so a damaged copy could load with wrong
    weights: check them first (about a second per GB)."""
    if not zipfile.is_zipfile(path):
        return  # truncated or not a zip at all: torch.load says so
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
        raise ValueError(f"{path} is not a readable checkpoint (damaged zip archive: {err})") from err
    if bad is not None:
        raise ValueError(f"{path} is corrupt: the checksum of {bad} inside it does not match (a damaged copy?)")


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_training_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    obj = load(path, map_location)
    if not is_training_checkpoint(obj):
        raise ValueError(f"{path} is not an mlaan training checkpoint (last.pt / best.pt written by mlaan train)")
    check_training_checkpoint(obj, path)
    return obj


def check_training_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """ValueError if a training checkpoint has a missing or malformed field, or is from a newer mlaan."""
    from .safety import check_checkpoint_fields

    check_checkpoint_fields(obj, path)
    if obj.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer mlaan (checkpoint version {obj['version']} > {VERSION})")


def check_compatible(ckpt: dict, arch: str, method: str, local_modules: int, path: str | os.PathLike) -> None:
    """Refuse a checkpoint of another architecture, method or K, naming both values."""
    wanted = {"arch": arch, "method": method, "local_modules": local_modules}
    for key in IDENTITY_KEYS:
        if ckpt.get(key) != wanted[key]:
            flag = {"arch": "--arch", "method": "--method", "local_modules": "--local-modules"}[key]
            raise ValueError(
                f"checkpoint {path} is for {key}={ckpt.get(key)!r} but this run has {flag} {wanted[key]!r}; "
                "use a matching run or another --output-dir"
            )


# ----------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors (python's and numpy's states converted)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(py_state), dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gauss = float(state["python_gauss"][0])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if gauss != gauss else gauss))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0]))
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------------- export
def data_root_of(ckpt: dict) -> str | None:
    """Where a run's data were actually read from (a Debian folder rather than the default ``data``, say),
    falling back to its configured data root for checkpoints that do not say."""
    source = ckpt.get("data_source")
    if source and Path(source).is_dir():
        return str(source)
    return ckpt.get("config", {}).get("data_root")


def local_model_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> Any:
    """The whole :class:`~mlaan.LocalModel` (backbone, aux nets, EMA twins) of a training checkpoint, built
    with the run's options and loaded with its weights. ValueError when the weights do not fit."""
    from .. import create_local_model
    from .config import FIELD_NAMES, merge

    config = merge({k: v for k, v in ckpt.get("config", {}).items() if k in FIELD_NAMES})
    model = create_local_model(
        ckpt["arch"], method=ckpt["method"], num_local_modules=ckpt["local_modules"],
        num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"], image_size=ckpt["image_size"],
        **config.engine_options(tuple(ckpt["mean"]), tuple(ckpt["std"])),
    )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"checkpoint {path} does not fit its own model: {first}") from err
    return model


def export_backbone(ckpt: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the plain backbone's state_dict to ``out`` and its build recipe to ``out`` with ``.json``."""
    prefix = "backbone."
    state = {k[len(prefix):]: v.detach().clone() for k, v in ckpt["model"].items() if k.startswith(prefix)}
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
        "data_options": {k: v for k, v in ckpt.get("config", {}).items() if k.startswith("synthetic_")},
        "trained_with": {"method": ckpt["method"], "local_modules": ckpt["local_modules"]},
        "epoch": ckpt.get("epoch"),  # epochs completed when these weights were saved
        "step": ckpt.get("step"),
        "best_accuracy": ckpt.get("best_accuracy"),  # the run's best test accuracy, reached at best_epoch
        "best_epoch": ckpt.get("best_epoch"),
        "is_best": ckpt.get("epoch") == ckpt.get("best_epoch") and not ckpt.get("epoch_step"),
        "load_with": f"{load_with}.load_state_dict(torch.load({out.name!r}, weights_only=True))",
    }
    atomic_save(state, out)
    atomic_write_text(json.dumps(meta, indent=2) + "\n", meta_path)
    return out, meta_path
