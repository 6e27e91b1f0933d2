"""``TrainConfig``: every option of ``mlaan train`` in one flat dataclass (nanoGPT style).

The run's own settings are declared here, once each (:class:`RunConfig`, :func:`run_field`): with its help, its
group of ``--help`` and its resume policy, from which come ``mlaan train``'s flags, the YAML keys and
:data:`RESUME_FREE`. The engine's and the methods' options are added as fields from their one declaration
(:func:`mlaan.engine.options.option_fields`), so a method's option is a config key, a flag and an entry of
``metrics.json`` without being written out here.

Resolution order, later wins: the dataclass defaults < a resumed checkpoint's config < the ``--config`` YAML
file < flags given explicitly on the command line. ``resolve()`` fills the values that depend on others
(K for BP, the output folder, the device, the loader workers) and checks names, so that a bad value is
reported before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..distributed.modes import BOUNDARY_MODES, PARALLEL_MODES, PARTITION_MODES
from ..engine import parse_method
from ..engine.engine_options import SHARED_TWIN_TRUNKS, recompute_options
from ..engine.options import LocalOptions, check_finite, option_fields, options_ignored, spelled, unmet_text
from ..names import unknown

# Options ``resolve()`` derives from others when they are not set (None), with how.
DERIVED_WHEN_UNSET = {
    "local_modules": "unset: the architecture's default K for the method (1 for bp)",
    "output_dir": "unset: runs/<dataset>-<arch>-<method>-K<K>",
    "filter_bias_and_bn": "unset: on for --opt adamw, off for sgd (the paper decays every parameter)",
}
T = TypeVar("T")
OPTIMIZERS = ("sgd", "adamw")  # --opt (mlaan.training.loop.make_optimizer)

# The groups of ``mlaan train --help`` that the run's own options fall in (a field's ``metadata["group"]``), in the
# order they are listed; each method's options get a group of their own after "model and method".
GROUPS = {
    "data": "data",
    "model": "model and method",
    "optimisation": "optimisation",
    "run": "run",
    "output": "output and resume",
    "parallel": "parallelism (under torchrun; docs/PARALLELISM.md)",
}
# What ``--resume`` does with an option (a field's ``metadata["resume"]``):
#   "kept": the run's own value; giving another is refused (it would change what the run computes);
#   "free": may change between a run and its resumption (where and how fast it runs, not what it computes);
#   "per_invocation": free, and not inherited from the checkpoint (it asks something of this invocation only).
RESUME_POLICIES = ("kept", "free", "per_invocation")
PRECISE_BN_HELP = ("re-estimate the BatchNorm statistics on N training batches before evaluating, on a copy of the "
                   "network (precise BN): the running averages lag when weights move fast, as local modules' do "
                   "at a high learning rate; training itself is unchanged")


def run_field(default: Any = dataclasses.MISSING, *, group: str | None, resume: str, help: str = "",
              short: str | None = None, metavar: str | tuple[str, ...] | None = None,
              choices: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING,
              read_when: dict[str, tuple[Any, ...]] | None = None) -> Any:
    """A run option's field, declared once: its default and what ``mlaan train`` makes of it.

    ``group``: its group of ``--help`` (a key of :data:`GROUPS`; None: a config key with no flag). ``resume``: one
    of :data:`RESUME_POLICIES`. ``help``: the flag's help, where ``{default}`` stands for the default. ``short``:
    a second spelling of the flag (``-K``); ``metavar`` and ``choices`` as argparse takes them. ``read_when``: the
    values of other run options with which the run reads it (``betas``: ``{"opt": ("adamw",)}``); with others it
    is ignored (:func:`run_options_ignored`). The flag is ``--field-name``, typed by the field's type (a bool one
    is ``--x/--no-x``)."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
    if resume not in RESUME_POLICIES:
        raise ValueError(f"unknown resume policy {resume!r}; known: {', '.join(RESUME_POLICIES)}")
    metadata = {"group": group, "resume": resume, "help": help, "short": short, "metavar": metavar,
                "choices": choices, "read_when": read_when or {}}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def data_set_field(default: int) -> Any:
    """A data set's own option (``synthetic_train_size``), declared in the data-set registry
    (:class:`mlaan.data.DatasetOption`), which gives its flag's help and metavar; here its config field."""
    return field(default=default, metadata={"group": "data", "resume": "kept", "data_set_option": True})


def _unmet_run_conditions(values: Mapping[str, Any]) -> dict[str, list[tuple[str, tuple, Any]]]:
    """Run options (by name) read only with values of another run option that ``values`` (missing: defaults)
    does not hold: each with (other option, the values it would need, the value it has)."""
    unmet = {}
    for f in dataclasses.fields(RunConfig):
        for other, allowed in f.metadata.get("read_when", {}).items():
            held = values.get(other, getattr(RunConfig, other, None))
            if held not in allowed:
                unmet.setdefault(f.name, []).append((other, allowed, held))
    return unmet


def run_options_ignored(values: Mapping[str, Any]) -> frozenset[str]:
    """The run options a run with these option ``values`` ignores (``betas`` with ``opt="sgd"``): for the
    warning of ``mlaan train`` and what ``--resume`` compares."""
    return frozenset(_unmet_run_conditions(values))


def why_run_option_ignored(name: str, values: Mapping[str, Any]) -> str:
    """Why a run with option ``values`` ignores run option ``name`` (one of :func:`run_options_ignored`)."""
    return unmet_text(_unmet_run_conditions(values)[name])


@dataclass
class RunConfig:
    """The run's own options (data, optimisation, run, output, parallelism): every field declared with
    :func:`run_field`, from which come ``mlaan train``'s flags and the keys of its YAML files; ``--resume`` reads
    each one's ``resume`` policy (:data:`RESUME_FREE`). :class:`TrainConfig` adds the engine's and the methods'."""

    # data
    dataset: str = run_field("fashion-mnist", group="data", resume="kept",
                             help="data set name (default: {default}; list below)")
    data_root: str | None = run_field("data", group="data", resume="free", metavar="DIR",
                                      help="data folder (default: {default}; fashion-mnist also looks in "
                                           "/usr/share/datasets/fashion-mnist)")
    download: bool = run_field(False, group="data", resume="free",
                               help="download a torchvision data set into --data-root if missing")
    train_samples: int | None = run_field(None, group="data", resume="kept", metavar="N",
                                          help="use only the first N training samples")
    test_samples: int | None = run_field(None, group="data", resume="kept", metavar="N",
                                         help="evaluate on the first N test samples only")
    synthetic_train_size: int = data_set_field(2048)
    synthetic_test_size: int = data_set_field(512)
    synthetic_image_size: int = data_set_field(32)
    # model and method
    arch: str = run_field("resnet32", group="model", resume="kept",
                          help="architecture (default: {default}; list below), or torchvision:NAME / timm:NAME "
                               "(e.g. torchvision:vgg11_bn, timm:vit_tiny_patch16_224)")
    image_size: int | None = run_field(None, group="model", resume="kept", metavar="S",
                                       help="image side the model is built for; batches of another size are "
                                            "resized to it (default: the data set's)")
    method: str = run_field("dgl+mlaan", group="model", resume="kept",
                            help="local-learning method (default: {default}; list below)")
    local_modules: int | None = run_field(None, group="model", resume="kept", short="-K", metavar="K",
                                          help="number of local modules, the stem's included (default: the "
                                               "architecture's: the paper's K, 16 for resnet32 and 55 for "
                                               "resnet110, else one module per residual block; 1 for bp)")
    # optimisation (docs/METHOD.md#training-recipe: SGD, Nesterov, momentum 0.9, linear warm-up then cosine per step)
    epochs: int = run_field(10, group="optimisation", resume="kept", help="(default: {default})")
    batch_size: int = run_field(128, group="optimisation", resume="kept", help="(default: {default})")
    eval_batch_size: int | None = run_field(None, group="optimisation", resume="free",
                                            help="(default: 2 x batch size)")
    # evaluation only: it re-estimates BatchNorm statistics on a copy (training is unchanged)
    precise_bn: int = run_field(0, group="optimisation", resume="free", metavar="N",
                                help=PRECISE_BN_HELP + " (default: {default}, off)")
    lr: float = run_field(0.1, group="optimisation", resume="kept", help="peak learning rate (default: {default})")
    momentum: float = run_field(0.9, group="optimisation", resume="kept", help="--opt sgd: (default: {default})",
                                read_when={"opt": ("sgd",)})
    nesterov: bool = run_field(True, group="optimisation", resume="kept", help="--opt sgd: (default: on)",
                               read_when={"opt": ("sgd",)})
    weight_decay: float = run_field(1e-4, group="optimisation", resume="kept", help="(default: {default})")
    warmup_epochs: float = run_field(1.0, group="optimisation", resume="kept",
                                     help="linear warm-up, then cosine decay per step (default: {default})")
    opt: str = run_field("sgd", group="optimisation", resume="kept",
                         help="optimizer: sgd (the paper's, Nesterov) or adamw (use a smaller --lr, e.g. 1e-3) "
                              "(default: {default})")
    betas: tuple[float, float] = run_field((0.9, 0.999), group="optimisation", resume="kept", metavar=("B1", "B2"),
                                           help="--opt adamw: its betas (default: {default[0]} {default[1]})",
                                           read_when={"opt": ("adamw",)})
    filter_bias_and_bn: bool | None = run_field(None, group="optimisation", resume="kept",
                                                help="no weight decay on norms, biases and the model's "
                                                     "no_weight_decay() names (timm's convention) (default: on for "
                                                     "adamw, off for sgd)")
    clip_grad: float | None = run_field(None, group="optimisation", resume="kept", metavar="NORM",
                                        help="clip each local module's gradient norm (its blocks and aux nets "
                                             "together, so that no module is scaled by another's gradient) to NORM; "
                                             "bp: one global norm (default: off)")
    mixup: float = run_field(0.0, group="optimisation", resume="kept", metavar="ALPHA",
                             help="timm's Mixup on training batches, Beta(ALPHA, ALPHA) (default: 0, off; needs timm)")
    cutmix: float = run_field(0.0, group="optimisation", resume="kept", metavar="ALPHA",
                              help="timm's CutMix on training batches; with --mixup, one of the two per batch "
                                   "(default: 0, off; needs timm)")
    max_steps: int | None = run_field(None, group="optimisation", resume="per_invocation", metavar="N",
                                      help="stop after N optimizer steps in all (the schedule still spans --epochs; "
                                           "not carried over by --resume)")
    save_every: int | None = run_field(None, group="optimisation", resume="free", metavar="N",
                                       help="also save last.pt every N optimizer steps, not only at the end of each "
                                            "epoch (a killed run then loses at most N steps; resuming gives the "
                                            "same result)")
    # run; precision, memory format and threads change how fast a run goes, and float rounding only: free on resume
    seed: int = run_field(0, group="run", resume="kept", help="(default: {default})")
    device: str = run_field("auto", group="run", resume="free", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    amp: bool = run_field(False, group="run", resume="free",
                          help="bf16 autocast, losses and optimizer in fp32: CUDA, or a CPU with AVX512-BF16/AMX-BF16 "
                               "(elsewhere a warning and fp32). Faster on CUDA and AMX; measured slower with "
                               "AVX512-BF16 alone (default: off)")
    channels_last: bool | None = run_field(None, group="run", resume="free",
                                           help="channels-last memory format for the model and batches (default: on "
                                                "for CPU runs, measured 0.80-0.86x the step time; off on GPUs)")
    threads: int | None = run_field(None, group="run", resume="free", metavar="N",
                                    help="CPU threads per process (default: the cores idle when the run starts, "
                                         "shared among torchrun's local processes; a busy core would stall a larger "
                                         "team). A bit-identical resume needs the same count")
    sync_bn: bool = run_field(False, group="run", resume="kept", help="SyncBatchNorm in distributed runs (torchrun)")
    # a module-parallel run resumes in one process or with another number of ranks, and back
    parallel: str = run_field("data", group="parallel", resume="free", choices=PARALLEL_MODES,
                              help="what torchrun's processes split: 'data' (each its share of every batch) or "
                                   "'modules' (each a run of local modules, all training at once on consecutive "
                                   "batches) (default: data)")
    boundary: str = run_field("exact", group="parallel", resume="kept", choices=BOUNDARY_MODES,
                              help="--parallel modules: MLM cascades that cross ranks are waited for ('exact', "
                                   "results as in one process) or stop at rank boundaries ('cut', another "
                                   "algorithm, faster) (default: exact)")
    partition: str = run_field("time", group="parallel", resume="free", choices=PARTITION_MODES,
                               help="--parallel modules: the modules are split over ranks evening out measured "
                                    "'time', 'blocks' or step 'memory' (default: time)")
    # resumable on another layout: the schedule's check (resume.check_schedule) refuses another global batch
    data_parallel: int = run_field(1, group="parallel", resume="free", metavar="R",
                                   help="--parallel modules: R replicas of the pipeline, each on world/R processes "
                                        "and its 1/R of every batch, each stage averaging its gradients with its "
                                        "replicas (as --parallel data on R processes) (default: 1)")
    dist_timeout: float = run_field(600.0, group="parallel", resume="free", metavar="SECONDS",
                                    help="how long a process waits for another before the run fails instead of "
                                         "hanging (default: 600)")
    workers: int | None = run_field(None, group="run", resume="free",
                                    help="data-loader workers (default: 0 on CPU, up to 8 on CUDA)")
    data_on_device: bool = run_field(False, group="run", resume="kept",
                                     help="hold the images on the training device and crop, flip and normalise "
                                          "whole batches there instead of a DataLoader: for in-memory data sets "
                                          "(fashion-mnist, synthetic), much faster for small images on a GPU; "
                                          "another random stream than the loader's (default: off)")
    output_dir: str | None = run_field(None, group="output", resume="free", metavar="DIR",
                                       help="where outputs go (default: runs/<dataset>-<arch>-<method>-K<K>)")
    tensorboard: bool = run_field(False, group="output", resume="free",
                                  help="also write TensorBoard logs to <output-dir>/tensorboard")
    overwrite: bool = run_field(False, group="output", resume="per_invocation",
                                help="replace a finished or stopped run in the output folder")
    # asks to go on with another global batch (resume.check_schedule), for this invocation
    rescale_schedule: bool = run_field(False, group="output", resume="per_invocation",
                                       help="--resume on another number of processes or global batch: go on with the "
                                            "learning-rate schedule rescaled to the new steps per epoch (refused "
                                            "without it)")
    # free-form notes kept with the run (a config key, no flag)
    extra: dict[str, Any] = run_field(group=None, resume="free", default_factory=dict)


OPTION_FIELDS = tuple(option_fields(include_derived=False))  # the engine's and methods' options, as config keys
OPTION_NAMES = tuple(f.name for f in OPTION_FIELDS)
# The engine's and methods' options are declared in mlaan.engine (engine_options.py, each method's Options), with
# no resume policy: they say what a step computes, so a resume keeps them ("kept"), but for these, which change
# only a step's memory or speed: recomputation and how BP's checkpointing is cut, and torch.compile (the same step
# to float rounding, the same state_dict keys).
OPTION_RESUME = {**dict.fromkeys(recompute_options(), "free"), "compile": "free"}


def _with_declared_options(cls: type[T]) -> type[T]:
    """``cls`` made a dataclass whose fields are its bases' followed by every engine and method option
    (:data:`OPTION_FIELDS`), each with its default, owner and resume policy in its metadata.

    They are added here rather than written in the class because they are collected when this module is imported
    from the methods registered then, a plug-in's included (``mlaan.methods`` entry points): no static list holds
    them. The run's own options are written out in :class:`RunConfig`, where an editor sees them."""
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for option in OPTION_FIELDS:
        annotations[option.name] = option.type
        metadata = {"owner": option.owner, "help": option.help, "resume": OPTION_RESUME.get(option.name, "kept")}
        setattr(cls, option.name, field(default=option.default, metadata=metadata))
    cls.__annotations__ = annotations
    return dataclass(cls)


@_with_declared_options
class TrainConfig(RunConfig):
    """Every option of ``mlaan train``: the run's settings (:class:`RunConfig`) and every declared engine and
    method option (fields added from their declarations by :func:`_with_declared_options`)."""

    def engine_options(self, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
        """Keyword options for ``mlaan.create_local_model``: every declared option the method reads, the derived
        ones included (the data set's ``mean``/``std``, the batch that ``balance="memory"`` evens out)."""
        options = {name: getattr(self, name) for name in OPTION_NAMES}
        options.update(image_mean=tuple(mean), image_std=tuple(std), balance_batch_size=self.batch_size)
        unused = options_ignored(self.method, options)  # they change nothing, and the API would warn of them
        return {name: value for name, value in options.items() if name not in unused}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), safe for JSON, YAML and ``torch.load(weights_only=True)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def resolve(self) -> TrainConfig:
        """A copy with derived values filled in and every name and range checked (ValueError). The device
        is checked where it is opened (``mlaan.distributed.init_from_env``)."""
        from .. import models
        from ..data import check_dataset_name
        from ..engine.local_model import check_lam_trunk, check_num_local_modules, default_num_local_modules

        dataset = check_dataset_name(self.dataset)  # in any case, recorded as registered
        # registered (in any case, recorded as registered), or torchvision:NAME / timm:NAME from the library's list
        arch = models.check_arch(self.arch)
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        spec = parse_method(self.method)  # ValueError naming the allowed methods
        cfg = dataclasses.replace(self, dataset=dataset, arch=arch, method=spec.name)
        if cfg.local_modules is None:
            cfg.local_modules = default_num_local_modules(cfg.arch, spec)
        check_finite(dataclasses.asdict(cfg))  # nan/inf would slip through the range checks
        options = LocalOptions(**{name: getattr(cfg, name) for name in OPTION_NAMES})  # each option's own checks
        for name, value in spelled({name: getattr(cfg, name) for name in OPTION_NAMES}).items():
            setattr(cfg, name, value)  # a choice in any case, recorded as the option spells it (MLP -> mlp)
        if not 0 <= cfg.seed < 2**32:
            raise ValueError(f"seed must be in 0 to {2**32 - 1}, got {cfg.seed}")
        for name in ("epochs", "batch_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        check_precise_bn(cfg.precise_bn)
        if not cfg.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be a positive number of seconds, got {cfg.dist_timeout}")
        for name in ("max_steps", "eval_batch_size", "save_every", "threads"):
            value = getattr(cfg, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if cfg.lr <= 0 or cfg.weight_decay < 0 or cfg.warmup_epochs < 0 or not 0 <= cfg.momentum < 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, warmup_epochs >= 0, 0 <= momentum < 1; got lr={cfg.lr}, "
                f"weight_decay={cfg.weight_decay}, warmup_epochs={cfg.warmup_epochs}, momentum={cfg.momentum}"
            )
        _check_recipe(cfg)
        _check_parallel(cfg, spec)  # first: "--parallel modules needs a local method" says more than "K must be 1"
        check_lam_trunk(spec, options)  # the engine's own check, here too for --print-config and `bench accuracy`
        # the engine's own check of K (and window) against the architecture, here so that it names the allowed
        # range before anything is written (and for --print-config)
        check_num_local_modules(spec, options, cfg.local_modules, models.max_local_modules(cfg.arch), cfg.arch,
                                "local_modules")
        if cfg.workers is not None and cfg.workers < 0:
            raise ValueError(f"workers must be >= 0, got {cfg.workers}")
        check_output_dir_name(cfg.output_dir)
        if cfg.output_dir is None:
            arch = cfg.arch.replace(":", "-")
            cfg.output_dir = str(Path("runs") / f"{cfg.dataset}-{arch}-{cfg.method}-K{cfg.local_modules}")
        return cfg

    @property
    def module_parallel(self) -> bool:
        """Whether torchrun's processes train different local modules (``--parallel modules``)."""
        return self.parallel == "modules"

    def resolved_workers(self, device_type: str) -> int:
        if self.workers is not None:
            return self.workers
        return 0 if device_type == "cpu" else min(8, os.cpu_count() or 1)


def check_precise_bn(value: Any) -> int:
    """``precise_bn``, the number of training batches BatchNorm statistics are re-estimated on before evaluating
    (0: off), checked for ``mlaan train`` and for ``mlaan eval``/``export``: ValueError unless an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"precise_bn must be a number of batches >= 0 (0: off), got {value!r}")
    return value


def check_output_dir_name(output_dir: str | None) -> None:
    """ValueError for an output folder named by an empty (or blank) string: ``Path("")`` is the current folder,
    so ``--output-dir "$UNSET"`` would write the run among whatever is there."""
    if output_dir is not None and not str(output_dir).strip():
        raise ValueError(f"output_dir {output_dir!r} is empty: name a folder (--output-dir DIR; an unset shell "
                         "variable?), or leave it out for runs/<dataset>-<arch>-<method>-K<K>")


def _check_recipe(cfg: TrainConfig) -> None:
    """The user's-recipe options (optimizer, clipping, mixup) checked, ``filter_bias_and_bn`` filled in (on for
    adamw, off for sgd); ValueError in one line, naming the extra to install when --mixup/--cutmix lack timm."""
    import importlib.util

    if cfg.opt not in OPTIMIZERS:
        raise ValueError(unknown("opt", cfg.opt, OPTIMIZERS, word="allowed"))
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(cfg.betas)}")
    if cfg.filter_bias_and_bn is None:
        cfg.filter_bias_and_bn = cfg.opt != "sgd"
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise ValueError(f"clip_grad must be a gradient norm > 0, got {cfg.clip_grad}")
    for name in ("mixup", "cutmix"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be an alpha >= 0 (0: off), got {getattr(cfg, name)}")
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if importlib.util.find_spec("timm") is None:
            raise ValueError("--mixup/--cutmix use timm's Mixup, which is not installed: pip install -e '.[timm]'")
    if cfg.parallel == "modules":
        given = [f"--{n.replace('_', '-')}" for n in ("mixup", "cutmix") if getattr(cfg, n) > 0]
        given += ["--clip-grad"] if cfg.clip_grad is not None else []
        if given:
            raise ValueError(f"{' and '.join(given)} are not supported with --parallel modules yet (use "
                             "--parallel data)")


def _check_parallel(cfg: TrainConfig, spec: Any) -> None:
    """The parallelism settings against each other and the method; a LAM method under ``--parallel modules`` gets
    ``ema_lag=1`` (a twin whose block is on the next rank follows it one step late, docs/PARALLELISM.md)."""
    from ..distributed.modes import BOUNDARY_MODES, PARALLEL_MODES, PARTITION_MODES

    for name, allowed in (("parallel", PARALLEL_MODES), ("boundary", BOUNDARY_MODES),
                          ("partition", PARTITION_MODES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; allowed: {', '.join(allowed)}")
    if isinstance(cfg.data_parallel, bool) or not isinstance(cfg.data_parallel, int) or cfg.data_parallel < 1:
        raise ValueError(f"data_parallel must be a number of replicas >= 1, got {cfg.data_parallel!r}")
    if cfg.parallel != "modules":
        if cfg.data_parallel > 1:  # the same words as mlaan.distributed.mesh.check_layout's
            raise ValueError(f"--data-parallel {cfg.data_parallel} replicates a module pipeline: it needs "
                             "--parallel modules (--parallel data alone already splits every batch over all "
                             "processes)")
        return
    if spec.end_to_end:
        raise ValueError(f"--parallel modules needs a local-learning method; {spec.name!r} trains end to end "
                         "(use --parallel data)")
    if cfg.sync_bn:
        raise ValueError("--sync-bn is for --parallel data: under --parallel modules each BatchNorm lives on one rank")
    if spec.leap and str(cfg.lam_trunk).lower() in SHARED_TWIN_TRUNKS:  # the engine would say ema_lag 1, set here
        raise ValueError(f"--lam-trunk {cfg.lam_trunk} is not supported with --parallel modules: its shared EMA "
                         "twins follow their blocks in the same step, and a block on another rank is seen one step "
                         "late (use --lam-trunk copies, or --parallel data)")
    if spec.leap:
        cfg.ema_lag = 1


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
# Options that may change between a run and its resumption: where and how it runs, not what it computes (arch,
# method and local_modules are checked against the checkpoint itself, with their own message); and those of one
# invocation, which a resumed run does not inherit (it goes on to --epochs unless told otherwise).
RESUME_FREE = frozenset(f.name for f in fields(TrainConfig) if f.metadata["resume"] != "kept")
PER_INVOCATION = tuple(f.name for f in fields(TrainConfig) if f.metadata["resume"] == "per_invocation")
_TYPES = typing.get_type_hints(TrainConfig)


def coerce(name: str, value: Any) -> Any:
    """Convert a value from YAML or a checkpoint to the type of field ``name`` (ValueError if impossible)."""
    if name not in _TYPES:
        raise ValueError(unknown("config key", name, FIELD_NAMES, word="known keys"))
    hint = _TYPES[name]
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {name!r} cannot be null")
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            # a choice in any case is recorded as the option spells it (MLP -> mlp); a wrong one is left for the
            # option's own check, which names the allowed values
            return spelled({name: str(value)})[name]
        if origin is tuple:
            if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
                raise TypeError
            return tuple(float(v) for v in value)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            try:
                json.dumps(value, allow_nan=False)  # plain data, no cycles (YAML aliases), storable in a checkpoint
            except RecursionError as err:
                raise ValueError from err
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"config key {name!r}: {value!r} is not a valid {_type_name(_TYPES[name])}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice (the plain one keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # YAML's "? [a, b]" complex key: a list, not an option name
                what = f"a key must be a name, got a {type(key).__name__}"
                raise yaml.constructor.ConstructorError(None, None, what, key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


BASE_KEY = "base"  # a config file's list of files it builds on (mmcv's ``_base_``), not an option
# flags of one invocation that name files or actions, not settings of the run: never read from a config file
COMMAND_LINE_ONLY = ("config", "resume", "print_config")


MAX_BASE_DEPTH = 32  # bases of bases: deeper than any sane layout, shallow enough to say so before Python would


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's keys, checked and converted (dashes in keys are accepted for underscores).

    ``base: FILE`` or ``base: [FILE, ...]`` (paths relative to the folder of this file as named, not of a
    symlink's target) builds on other config files: their keys first, in order, later files winning, then this
    file's own keys over all of them, so that a recipe is written once (``configs/_base/``). Bases may have
    bases (at most :data:`MAX_BASE_DEPTH` deep), each file read once. ValueError naming the file for a file
    reached twice on one chain (a circle), a base listed twice, or one that is not a file; FileNotFoundError for
    a missing base."""
    return _load_with_bases(Path(path), (), {})


def _load_with_bases(path: Path, chain: tuple[Path, ...], done: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain, here))
        raise ValueError(f"config files build on each other in a circle: {cycle}")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ValueError(f"config file {chain[0]}: its bases are nested more than {MAX_BASE_DEPTH} files deep")
    if here in done:  # the same base on two branches: read once (a file listing one twice would double each level)
        return done[here]
    raw = _read_mapping(path)
    values: dict[str, Any] = {}
    for name in _base_names(path, raw.pop(BASE_KEY, None)):
        base = path.parent / name
        if not base.exists():
            raise FileNotFoundError(f"config file {path}: its {BASE_KEY} {name!r} does not exist ({base})")
        if not base.is_file():
            raise ValueError(f"config file {path}: its {BASE_KEY} {name!r} is not a file ({base}); give a YAML file")
        values.update(_load_with_bases(base, (*chain, here), done))
    values.update(_converted(path, raw))
    done[here] = values
    return values


def _base_names(path: Path, bases: Any) -> list[str]:
    """A file's ``base`` value as a list of file names; ValueError for anything else, or a name listed twice."""
    if bases is None:
        return []
    names = [bases] if isinstance(bases, str) else bases
    if not (isinstance(names, list) and names and all(isinstance(b, str) and b.strip() for b in names)):
        raise ValueError(f"config file {path}: {BASE_KEY} must be a file name or a list of file names "
                         f"(relative to {path.parent}), got {bases!r}")
    twice = sorted({b for b in names if names.count(b) > 1})
    if twice:
        raise ValueError(f"config file {path}: {BASE_KEY} lists {', '.join(map(repr, twice))} twice; keep one")
    return names


def _read_mapping(path: Path) -> dict[Any, Any]:
    """The YAML mapping a config file holds, or a one-line error saying why it is not one."""
    if path.is_dir():
        raise IsADirectoryError(f"config file {path} is a folder; give a YAML file (configs/*.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        problem = str(err).replace("\n", " ")
        raise ValueError(f"config file {path} is not valid YAML: {problem}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except RecursionError as err:
        raise ValueError(f"config file {path} is nested too deeply") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(raw).__name__}")
    return raw


def _converted(path: Path, raw: dict[Any, Any]) -> dict[str, Any]:
    """A file's own keys as option names (dashes read as underscores), each value converted to its type."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name != BASE_KEY and name.strip("_").lower() == BASE_KEY:  # Base:, _base_: (mmcv's spelling)
            raise ValueError(f"config file {path}: unknown key {key!r}; a file builds on others with "
                             f"'{BASE_KEY}: [FILE, ...]'")
        if name.lower() in COMMAND_LINE_ONLY:  # Resume: too, rather than "unknown key"
            raise ValueError(f"config file {path}: {key!r} cannot be set in a config file; give "
                             f"--{name.lower().replace('_', '-')} on the command line")
        if name in spelled:  # batch_size and batch-size: YAML sees two keys, the run one option
            raise ValueError(f"config file {path} sets {name} twice ({spelled[name]!r} and {key!r}); keep one")
        spelled[name] = str(key)
        try:
            values[name] = coerce(name, value)
        except ValueError as err:
            raise ValueError(f"config file {path}: {err}") from err
    return values


def merge(*layers: dict[str, Any]) -> TrainConfig:
    """``TrainConfig`` from the defaults updated by each layer in turn (later layers win)."""
    values: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            values[name] = coerce(name, value)
    return TrainConfig(**values)
