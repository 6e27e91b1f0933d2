"""Evaluating a trained network from its file (``mlaan eval``), and writing re-estimated BatchNorm statistics into
a checkpoint before it is exported (``mlaan export --precise-bn``).

:func:`prepare_evaluation` does everything that can refuse (a checkpoint that does not fit the data set, a bad
count) before the data are read or downloaded, raising one-line ValueErrors (FileNotFoundError for a missing
file); :func:`evaluate_prepared` then measures; :func:`report_lines` says the result as ``mlaan eval`` prints it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import check_precise_bn


@dataclass
class PreparedEvaluation:
    """What :func:`evaluate_prepared` measures: the network of ``checkpoint`` (its plain ``backbone``, and the
    whole ``local_model`` when each module's aux net is measured too), on ``device``, and the ``test_set`` of
    the data set ``info`` describes; ``precise_bn`` batches re-estimated its BatchNorm statistics on
    ``precise_bn_images`` training images (0, 0: not done)."""

    checkpoint: str
    meta: dict[str, Any]
    backbone: Any
    local_model: Any
    device: Any
    test_set: Any
    info: Any
    precise_bn: int
    precise_bn_images: int


def evaluation_device(device: str, threads: int | None) -> Any:
    """The ``torch.device`` that ``device`` (auto, cpu, cuda, cuda:N, mps) names, for an evaluation in one
    process; on a CPU, ``threads`` threads (None: the cores idle now). ValueError for a device not there."""
    from .. import distributed, runtime

    ctx = distributed.init_from_env(device)
    distributed.cleanup(ctx)  # only the device is wanted: evaluation runs in one process
    if ctx.device.type == "cpu":  # a team larger than the idle cores stalls (BENCHMARKS.md "CPU fast path")
        runtime.apply_threads(runtime.choose_threads(threads))
    return ctx.device


def prepare_evaluation(checkpoint: str, device: Any, *, dataset: str | None = None, data_root: str | None = None,
                       download: bool = False, test_samples: int | None = None, batch_size: int = 256,
                       workers: int = 0, precise_bn: int | None = None, modules: bool = False,
                       warn: Callable[[str], None] = warnings.warn) -> PreparedEvaluation:
    """The network of ``checkpoint`` (a training checkpoint or an export) on ``device``, and the test split of
    ``dataset`` (None: the one it was trained on) read from ``data_root`` (None: where the run read it).

    ``precise_bn``: batches of the training set to re-estimate BatchNorm statistics on first (None: what the
    training run's evaluations used, 0 for an export). ``modules``: also the whole local model, to measure each
    module's aux net (a training checkpoint only). ``batch_size`` and ``workers`` are only checked here.
    ``warn(message)`` is told when another data set's images will be resized to the network's size. ValueError
    (one line) for a network that cannot take the data set, bad counts or a bad file; FileNotFoundError for a
    missing one; everything that can refuse without the data does so before they are read or downloaded."""
    from ..data import build_datasets, check_dataset_name, dataset_spec
    from .export import default_data_root, load_backbone

    state, meta = load_backbone(checkpoint)
    dataset = check_dataset_name(dataset or meta["dataset"])  # in any case
    spec = dataset_spec(dataset)
    check_fits(meta, checkpoint, dataset, spec.num_classes, spec.in_channels)
    if batch_size < 1 or workers < 0:
        raise ValueError(f"need --batch-size >= 1 and --workers >= 0, got {batch_size}, {workers}")
    backbone = backbone_for_eval(meta, state, checkpoint)
    local_model = local_model_for_eval(checkpoint) if modules else None
    options = meta.get("data_options", {}) if dataset == meta["dataset"] else {}
    batches = precise_bn_batches(meta, precise_bn)
    train_set, test_set, info = build_datasets(
        dataset, data_root or default_data_root(meta, dataset), download=download,
        test_samples=test_samples, with_train=batches > 0, **options
    )
    check_fits(meta, checkpoint, dataset, info.num_classes, info.in_channels)  # an ImageFolder's classes
    # Said here, before the progress bar, rather than by the model in the middle of it; a resize of the run's
    # own data set is the run's own (mlaan train --image-size), not worth a warning
    if dataset != meta["dataset"] and backbone.resize_inputs and info.image_size != meta["image_size"]:
        warn(f"{dataset}'s {info.image_size}x{info.image_size} images are resized to "
             f"{meta['image_size']}x{meta['image_size']}, the size {meta['arch']} was trained on")
    for net in (backbone, local_model.backbone if local_model is not None else None):
        expect_resize(net)
    images = re_estimate_batchnorm(backbone.to(device), meta, batches, device, train_set) if batches else 0
    if local_model is not None and batches:  # the modules see the re-estimated backbone too
        local_model.backbone.load_state_dict(backbone.state_dict())
    return PreparedEvaluation(checkpoint, meta, backbone, local_model, device, test_set, info, batches, images)


def evaluate_prepared(prepared: PreparedEvaluation, batch_size: int = 256, workers: int = 0) -> dict[str, Any]:
    """Test accuracy, error and loss of ``prepared``'s network (and, with its local model, of each module's aux
    net: ``module_accuracies``), in batches of ``batch_size`` read by ``workers`` loader processes; a JSON-ready
    report, as ``mlaan eval --json`` prints it."""
    from torch.utils.data import DataLoader

    from . import loop  # looked up at call time, so a test (or a user) can stand in for the loop's functions

    p = prepared
    loader = DataLoader(p.test_set, batch_size=batch_size, num_workers=workers)
    result = loop.evaluate_backbone(p.backbone.to(p.device), loader, p.device,
                               progress=f"evaluating on {len(p.test_set)} {p.info.name} test images")
    report = {
        "checkpoint": str(p.checkpoint),
        "arch": p.meta["arch"],
        "dataset": p.info.name,
        "test_images": result["count"],
        "test_accuracy": result["accuracy"],
        "test_error": 1.0 - result["accuracy"],
        "test_loss": result["loss"],
        "precise_bn": p.precise_bn,
        "precise_bn_images": p.precise_bn_images,  # fewer than precise_bn batches hold when the training set is small
    }
    if p.local_model is not None:
        report["module_accuracies"] = loop.evaluate_modules(p.local_model.to(p.device), loader, p.device)
    return report


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """An :func:`evaluate_prepared` report as ``mlaan eval`` says it: accuracy, error and loss in one line, then
    each module's aux-net accuracies (for the aux nets that were measured)."""
    precise = f" (precise BN on {report['precise_bn_images']} training images)" if report["precise_bn"] else ""
    lines = [
        f"{report['checkpoint']}: {report['arch']} on {report['dataset']} test ({report['test_images']} images): "
        f"accuracy {100 * report['test_accuracy']:.2f}%, error {100 * report['test_error']:.2f}%, "
        f"loss {report['test_loss']:.4f}" + precise
    ]
    for path, accuracies in (report.get("module_accuracies") or {}).items():
        if any(a is not None for a in accuracies[:-1]):
            shown = ", ".join("—" if a is None else f"{100 * a:.1f}" for a in accuracies)
            lines.append(f"test accuracy % of each local module's {path} aux net (the last: the backbone): {shown}")
    return lines


def replace_with_precise_bn(ckpt: dict, precise_bn: int | None, data_root: str | None) -> None:
    """Put BatchNorm statistics re-estimated on ``precise_bn`` training batches (None: the training run's
    --precise-bn) into training checkpoint ``ckpt``'s backbone state, in place (``mlaan export --precise-bn``);
    the data are read from ``data_root`` (None: where the run read them). ValueError for a negative count."""
    import torch

    from .. import models, runtime
    from ..data import build_datasets
    from . import export

    meta = export.describe_training_checkpoint(ckpt)
    batches = precise_bn_batches(meta, precise_bn)
    if not batches:
        return
    runtime.apply_threads(runtime.choose_threads(None))
    backbone = models.create(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    backbone.load_state_dict(export.backbone_state(ckpt))
    expect_resize(backbone)  # the run's own training set
    root = data_root or export.default_data_root(meta, meta["dataset"])
    train_set, _, _ = build_datasets(meta["dataset"], root, **meta["data_options"])
    re_estimate_batchnorm(backbone, meta, batches, torch.device("cpu"), train_set)
    ckpt["model"].update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})


def check_fits(meta: Mapping[str, Any], path: str, dataset: str, classes: int | None, channels: int) -> None:
    """ValueError (one line) when the network of checkpoint ``path`` (described by ``meta``) cannot take data set
    ``dataset``'s ``channels``-channel images or its ``classes`` classes (None: known only once the data are read,
    not compared), naming the data sets it can take."""
    from ..data import datasets_fitting

    if channels == meta["in_channels"] and classes in (None, meta["num_classes"]):
        return
    has = f"{classes} classes of " if classes is not None else ""
    # an ImageFolder's data set fits until read: after, it is not one of those it can take
    fitting = ", ".join(n for n in datasets_fitting(meta["num_classes"], meta["in_channels"]) if n != dataset)
    raise ValueError(
        f"checkpoint {path} was trained for {meta['num_classes']} classes of {meta['in_channels']}-channel images, "
        f"but {dataset} has {has}{channels}-channel images; data sets it can take: {fitting or 'none registered'}"
    )


def backbone_for_eval(meta: Mapping[str, Any], state: Mapping[str, Any], path: str) -> Any:
    """The plain backbone ``meta`` describes, holding ``state`` (a training checkpoint's backbone, or an export's);
    ValueError naming ``path`` when the weights do not fit."""
    from .. import models

    backbone = models.create(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    # an export of a torchvision:/timm: model has its class's keys (timm's ViTs name theirs "blocks." too: the
    # whole key set tells them apart)
    exported = backbone.source is not None and set(state) != set(backbone.state_dict())
    try:
        (backbone.source if exported else backbone).load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {meta['arch']}: {' '.join(str(err).split())[:300]}") from err
    return backbone


def expect_resize(backbone: Any) -> None:
    """No warning from ``backbone`` when it resizes batches (:attr:`mlaan.models.Backbone.warn_on_resize`): the
    command says so itself, or the resize is the training run's own (``mlaan train --image-size``)."""
    if backbone is not None:
        backbone.warn_on_resize = False


def precise_bn_batches(meta: Mapping[str, Any], given: int | None) -> int:
    """``--precise-bn`` of eval/export: the value given, else what the training run's evaluations used (0 for an
    export, which already holds the statistics it was evaluated with). ValueError for a negative count."""
    return check_precise_bn(meta.get("precise_bn", 0) if given is None else given)


def re_estimate_batchnorm(backbone: Any, meta: Mapping[str, Any], batches: int, device: Any, train_set: Any) -> int:
    """Re-estimate ``backbone``'s BatchNorm statistics in place on ``batches`` batches of ``train_set``, drawn as
    ``mlaan train --precise-bn`` drew them for the checkpoint's evaluation. Returns the images used."""
    from .loop import precise_batchnorm

    return precise_batchnorm(backbone, train_set, batches, meta.get("batch_size", 128), device,
                             seed=meta.get("seed", 0), step=meta.get("step", 0))


def local_model_for_eval(path: str) -> Any:
    """The whole local model of a training checkpoint (``--modules``); ValueError for an export."""
    from . import checkpoint as ckpt_io
    from .export import local_model_from_checkpoint

    obj = ckpt_io.load(path)
    if not ckpt_io.is_training_checkpoint(obj):
        raise ValueError(f"--modules needs a training checkpoint (last.pt / best.pt) with its aux nets; {path} "
                         "is an export of the backbone alone")
    return local_model_from_checkpoint(obj, path)
