"""The ``mlaan`` command (also ``python -m mlaan``): train, eval, export, download, and any subcommands that
``mlaan.bench.cli.register(subparsers)`` contributes.

Bad input — an unknown data set, architecture or method, K out of range, a missing data root or checkpoint —
is reported as one line, ``mlaan: error: …``, on stderr with exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import yaml

EXIT_USAGE = 2
PRECISE_BN_HELP = ("re-estimate the BatchNorm statistics on N training batches before evaluating, on a copy of the "
                   "network (precise BN): the running averages lag when weights move fast, as local modules' do "
                   "at a high learning rate; training itself is unchanged")
# Errors that mean "the input is wrong": reported in one line, exit 2.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, yaml.YAMLError)


class CLIError(Exception):
    """A message for the user and the exit code to leave with. ``per_rank``: under torchrun, an error of this
    process alone (a shard it could not write), not one of the flags and files every process of a node reads."""

    def __init__(self, message: str, code: int = EXIT_USAGE, per_rank: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.per_rank = per_rank or code != EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        # every torchrun process of a machine parses the same flags: its first one says what is wrong
        line = f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n"
        self.exit(EXIT_USAGE, line if _first_on_node() else None)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


class _Commands(argparse._SubParsersAction):
    """The subcommands, where contributed ones can be *deferred*: listed in the help from their one-line summaries
    and built (by their ``register``, which imports the benchmarks and torch) only when one of them is parsed or
    the list of parsers is walked. So ``mlaan --help`` and ``mlaan train --help`` import no torch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, argparse.Action] = {}  # deferred name -> its line in the help
        self._loader: Callable[[_Commands], None] | None = None
        self._name_parser_map = self.choices = _Parsers(self)

    def defer(self, summaries: Mapping[str, str], load: Callable[[_Commands], None]) -> None:
        """List ``summaries`` (name -> help) now; ``load(self)`` adds their parsers when first needed."""
        for name, text in summaries.items():
            self._pending[name] = self._ChoicesPseudoAction(name, (), text)
            self._choices_actions.append(self._pending[name])
        self._loader = load

    def is_pending(self, name: str) -> bool:
        """Whether ``name`` is a deferred subcommand not built yet."""
        return name in self._pending

    def load(self) -> None:
        """Build the deferred subcommands (their own help lines replace the summaries)."""
        load, self._loader = self._loader, None
        if load is None:
            return
        for line in self._pending.values():
            self._choices_actions.remove(line)
        self._pending.clear()
        load(self)


class _Parsers(dict):
    """Name -> parser of a :class:`_Commands`: knows the deferred names, and builds them on first lookup."""

    def __init__(self, owner: _Commands) -> None:
        super().__init__()
        self._owner = owner

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and self._owner.is_pending(name))

    def __len__(self) -> int:
        return super().__len__() + len(self._owner._pending)

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        if not super().__contains__(name):
            self._owner.load()
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        if not super().__contains__(name):
            self._owner.load()
        return super().get(name, default)

    def __iter__(self) -> Iterator[str]:
        self._owner.load()
        return super().__iter__()

    def keys(self) -> Any:
        self._owner.load()
        return super().keys()

    def values(self) -> Any:
        self._owner.load()
        return super().values()

    def items(self) -> Any:
        self._owner.load()
        return super().items()


# --------------------------------------------------------------------------------------------- help texts
def _catalogue() -> str:
    from . import models
    from .data import describe_datasets
    from .engine import available_methods

    width = max(len(n) for n in describe_datasets())
    lines = ["data sets:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in describe_datasets().items()]
    lines.append("architectures:")
    lines += textwrap.wrap(", ".join([*models.available(), "torchvision:NAME", "timm:NAME"]), 100,
                           initial_indent="  ", subsequent_indent="  ")
    lines.append("methods (BASE, or BASE+mlaan / +mlm / +lam; bp trains end to end with K=1):")
    lines += textwrap.wrap(", ".join(available_methods()), 100, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def _add_parser(subparsers, name: str, help_text: str, description: str) -> Parser:
    return subparsers.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ---------------------------------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    from .data import registered_datasets
    from .distributed.modes import BOUNDARY_MODES, PARALLEL_MODES, PARTITION_MODES
    from .training.config import TrainConfig

    d = TrainConfig()
    p = _add_parser(
        subparsers,
        "train",
        "train a network with a local-learning method",
        "Train with a local-learning method and write metrics.jsonl, metrics.json, last.pt and best.pt to the "
        "output folder.\nOptions come from the defaults, then --config FILE.yaml (any option below, with "
        "underscores: batch_size: 1024), then the flags given here.",
    )
    S = argparse.SUPPRESS  # only flags given explicitly reach the config, so they override the file
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file of options (flags override it; 'base: FILE' builds on other files)")
    p.add_argument("--print-config", dest="print_config", action="store_true",
                   help="print the run's resolved options as YAML (a config file) and exit; trains and writes nothing")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, help=f"data set name (default: {d.dataset}; list below)")
    g.add_argument("--data-root", dest="data_root", default=S, metavar="DIR",
                   help=f"data folder (default: {d.data_root}; fashion-mnist also looks in "
                        "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=S,
                   help="download a torchvision data set into --data-root if missing")
    g.add_argument("--train-samples", dest="train_samples", type=int, default=S, metavar="N",
                   help="use only the first N training samples")
    g.add_argument("--test-samples", dest="test_samples", type=int, default=S, metavar="N",
                   help="evaluate on the first N test samples only")
    for spec in registered_datasets():  # each data set's own options (--synthetic-train-size, ...)
        for option in spec.options:
            key = spec.option_key(option)
            g.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=S, metavar=option.metavar,
                           help=f"{spec.name}: {option.help} (default: {getattr(d, key)})")
    g = p.add_argument_group("model and method")
    g.add_argument("--arch", default=S, help=f"architecture (default: {d.arch}; list below), or torchvision:NAME "
                                             "/ timm:NAME (e.g. torchvision:vgg11_bn, timm:vit_tiny_patch16_224)")
    g.add_argument("--image-size", dest="image_size", type=int, default=S, metavar="S",
                   help="image side the model is built for; batches of another size are resized to it "
                        "(default: the data set's)")
    g.add_argument("--method", default=S, help=f"local-learning method (default: {d.method}; list below)")
    g.add_argument("--local-modules", "-K", dest="local_modules", type=int, default=S, metavar="K",
                   help="number of local modules, the stem's included (default: the architecture's: the "
                        "paper's K, 16 for resnet32 and 55 for resnet110, else one module per residual block; "
                        "1 for bp)")
    _add_option_flags(p, g)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help=f"(default: {d.epochs})")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S, help=f"(default: {d.batch_size})")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=S,
                   help="(default: 2 x batch size)")
    g.add_argument("--precise-bn", dest="precise_bn", type=int, default=S, metavar="N",
                   help=PRECISE_BN_HELP + f" (default: {d.precise_bn}, off)")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default: {d.lr})")
    g.add_argument("--momentum", type=float, default=S, help=f"(default: {d.momentum})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S, help="(default: on)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help=f"(default: {d.weight_decay})")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S,
                   help=f"linear warm-up, then cosine decay per step (default: {d.warmup_epochs})")
    g.add_argument("--opt", default=S, help=f"optimizer: sgd (the paper's, Nesterov) or adamw (use a smaller "
                                            f"--lr, e.g. 1e-3) (default: {d.opt})")
    g.add_argument("--betas", type=float, nargs=2, default=S, metavar=("B1", "B2"),
                   help=f"--opt adamw: its betas (default: {d.betas[0]} {d.betas[1]})")
    g.add_argument("--filter-bias-and-bn", dest="filter_bias_and_bn", action=argparse.BooleanOptionalAction,
                   default=S, help="no weight decay on norms, biases and the model's no_weight_decay() names "
                                   "(timm's convention) (default: on for adamw, off for sgd)")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=S, metavar="NORM",
                   help="clip each local module's gradient norm (its blocks and aux nets together, so that no "
                        "module is scaled by another's gradient) to NORM; bp: one global norm (default: off)")
    g.add_argument("--mixup", type=float, default=S, metavar="ALPHA",
                   help="timm's Mixup on training batches, Beta(ALPHA, ALPHA) (default: 0, off; needs timm)")
    g.add_argument("--cutmix", type=float, default=S, metavar="ALPHA",
                   help="timm's CutMix on training batches; with --mixup, one of the two per batch (default: 0, "
                        "off; needs timm)")
    g.add_argument("--max-steps", dest="max_steps", type=int, default=S, metavar="N",
                   help="stop after N optimizer steps in all (the schedule still spans --epochs; "
                        "not carried over by --resume)")
    g.add_argument("--save-every", dest="save_every", type=int, default=S, metavar="N",
                   help="also save last.pt every N optimizer steps, not only at the end of each epoch "
                        "(a killed run then loses at most N steps; resuming gives the same result)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S, help=f"(default: {d.seed})")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S,
                   help="bf16 autocast, losses and optimizer in fp32: CUDA, or a CPU with AVX512-BF16/AMX-BF16 "
                        "(elsewhere a warning and fp32). Faster on CUDA and AMX; measured slower with AVX512-BF16 "
                        "alone (default: off)")
    g.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=S,
                   help="channels-last memory format for the model and batches (default: on for CPU runs, "
                        "measured 0.80-0.86x the step time; off on GPUs)")
    g.add_argument("--threads", type=int, default=S, metavar="N",
                   help="CPU threads per process (default: the cores idle when the run starts, shared among "
                        "torchrun's local processes; a busy core would stall a larger team). A bit-identical "
                        "resume needs the same count")
    g.add_argument("--sync-bn", dest="sync_bn", action=argparse.BooleanOptionalAction, default=S,
                   help="SyncBatchNorm in distributed runs (torchrun)")
    g.add_argument("--workers", type=int, default=S, help="data-loader workers (default: 0 on CPU, up to 8 on CUDA)")
    g.add_argument("--data-on-device", dest="data_on_device", action=argparse.BooleanOptionalAction, default=S,
                   help="hold the images on the training device and crop, flip and normalise whole batches there "
                        "instead of a DataLoader: for in-memory data sets (fashion-mnist, synthetic), much faster "
                        "for small images on a GPU; another random stream than the loader's (default: off)")
    g = p.add_argument_group("output and resume")
    g.add_argument("--output-dir", dest="output_dir", default=S, metavar="DIR",
                   help="where outputs go (default: runs/<dataset>-<arch>-<method>-K<K>)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=S,
                   help="also write TensorBoard logs to <output-dir>/tensorboard")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=S,
                   help="replace a finished or stopped run in the output folder")
    g.add_argument("--rescale-schedule", dest="rescale_schedule", action=argparse.BooleanOptionalAction, default=S,
                   help="--resume on another number of processes or global batch: go on with the learning-rate "
                        "schedule rescaled to the new steps per epoch (refused without it)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH (a checkpoint, or a run folder: its last.pt), or from "
                        "<output-dir>/last.pt when no PATH is given")
    g = p.add_argument_group("parallelism (under torchrun; docs/PARALLELISM.md)")
    g.add_argument("--parallel", choices=PARALLEL_MODES, default=S,
                   help="what torchrun's processes split: 'data' (each its share of every batch) or 'modules' (each "
                        "a run of local modules, all training at once on consecutive batches) (default: data)")
    g.add_argument("--boundary", choices=BOUNDARY_MODES, default=S,
                   help="--parallel modules: MLM cascades that cross ranks are waited for ('exact', results as in "
                        "one process) or stop at rank boundaries ('cut', another algorithm, faster) (default: exact)")
    g.add_argument("--partition", choices=PARTITION_MODES, default=S,
                   help="--parallel modules: the modules are split over ranks evening out measured 'time', "
                        "'blocks' or step 'memory' (default: time)")
    g.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=S, metavar="SECONDS",
                   help="how long a process waits for another before the run fails instead of hanging "
                        "(default: 600)")
    p.set_defaults(func=cmd_train)


def _add_option_flags(parser: argparse.ArgumentParser, engine_group) -> None:
    """A flag ``--field-name`` for every declared option (engine's in ``engine_group``, each method's in a group
    of its own), typed and with its help and default, from the one declaration
    (:func:`mlaan.engine.options.option_fields`). Values are checked where the option is declared."""
    from .engine.options import who_reads
    from .training.config import OPTION_FIELDS

    groups = {"engine": engine_group}
    for f in OPTION_FIELDS:
        if f.owner not in groups:
            groups[f.owner] = parser.add_argument_group(f"{f.owner} options")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        reader = f"{who_reads(f.name)}; " if f.owner == "engine" else ""  # a method's options have their group
        # square brackets: the reader often says "(+mlm, +mlaan)", and the help may end in parentheses of its own
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{f.help} [{reader}default: {default}]"}
        if f.metavar is not None:
            kwargs["metavar"] = f.metavar
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(f.type) is tuple:
            items = typing.get_args(f.type)
            kwargs.update(type=float, nargs="+" if Ellipsis in items else len(items))
        else:
            kwargs["type"] = f.type
        flag = "--" + f.name.replace("_", "-")
        groups[f.owner].add_argument(flag, **kwargs)


_NOT_CONFIG = ("config", "resume", "print_config", "func", "command")


def cmd_train(args: argparse.Namespace) -> int:
    from .training import make_trainer
    from .training.run_folder import AUTO_RESUME
    from .training.safety import OutputWriteError, RunFolderInUse, RunStopped

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if args.resume not in (None, AUTO_RESUME):
        args.resume = _checkpoint_file(args.resume)
    if args.print_config:
        return _print_config(args.config, overrides, args.resume)
    try:
        trainer = make_trainer(args.config, overrides, args.resume, log=lambda m: print(m, flush=True))
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    try:
        trainer.fit()
    except FloatingPointError as err:
        raise CLIError(f"{err}; training stopped (try a lower --lr)", code=1) from err
    except RunStopped as err:  # SIGINT/SIGTERM: saved at a step boundary; every rank stops at the same step
        if _first_on_node():  # and would say the same: once per machine, like an error in the flags
            print(f"mlaan: {err}", file=sys.stderr)
        return err.code
    except OutputWriteError as err:  # disk full, folder made read-only: the last checkpoint is intact
        raise CLIError(str(err), per_rank=True) from err
    except RunFolderInUse as err:  # another run holds the folder (or wrote a run there since the build)
        raise CLIError(str(err), per_rank=True) from err
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        raise CLIError(
            f"out of memory at step {trainer.step + 1} ({_one_line(err)[:200]}); {trainer.checkpoints.kept()}; "
            "try a smaller --batch-size, or --grad-checkpointing", code=1,
        ) from err
    finally:
        trainer.close()
    return 0


def _checkpoint_file(given: str) -> str:
    """The checkpoint a ``--resume``/``--checkpoint`` path names: a run folder holding ``last.pt`` means that file,
    said on stderr (stdout may be YAML or JSON); anything else as given, for the command to check."""
    from .training.checkpoint import checkpoint_file, is_empty_path

    if is_empty_path(given):  # the command refuses it in its own words
        return given
    path = checkpoint_file(given)
    if path == Path(given):
        return given
    if _first_on_node():
        print(f"mlaan: using {path}", file=sys.stderr)
    return str(path)


def _print_config(config_file: str | None, overrides: dict, resume: str | None) -> int:
    """``mlaan train --print-config``: every option of the run as it would start, as a YAML config file that
    ``--config`` takes back. Options the run ignores are left out (and named in the first line); values
    ``resolve()`` derives from others when not given (K, the output folder) are printed as comments, so that the
    file does not pin them when another ``--arch`` or ``--method`` is given with it."""
    from .engine.options import options_ignored
    from .training import resolve_run
    from .training.config import DERIVED_WHEN_UNSET, load_yaml
    from .training.run_folder import RUN_FILES

    try:
        config, _, path = resolve_run(config_file, overrides, resume, check_data=False)
        given = set(overrides) | set(load_yaml(config_file) if config_file is not None else {})
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    values = config.to_dict()
    ignored = options_ignored(config.method, values) & set(values)
    derived = set() if path is not None else set(DERIVED_WHEN_UNSET) - given  # a resumed run's are its own
    source = " + ".join(str(s) for s in (path and f"resumed {path}", config_file, overrides and "flags") if s)
    lines = [f"# mlaan train: resolved options ({source or 'defaults'}); ignored by this run, left out: "
             f"{', '.join(sorted(ignored)) or 'none'}"]
    held = [n for n in RUN_FILES if (Path(config.output_dir) / n).exists()]
    if held and path is None and not config.overwrite:
        lines.append(f"# note: {config.output_dir} holds a run ({', '.join(held)}): mlaan train refuses it "
                     "without --resume or --overwrite")
    for name, value in values.items():
        if name in ignored:
            continue
        text = yaml.safe_dump({name: value}, sort_keys=False, allow_unicode=True).rstrip("\n")
        if name in derived:
            text = "\n".join(f"# {line}" for line in text.splitlines()) + f"   # {DERIVED_WHEN_UNSET[name]}"
        lines.append(text)
    print("\n".join(lines))
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), the CPU allocator's RuntimeError, or Python's MemoryError."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


# ----------------------------------------------------------------------------------------------------- eval
def _add_eval(subparsers) -> None:
    p = _add_parser(
        subparsers,
        "eval",
        "test accuracy of a checkpoint",
        "Evaluate the plain backbone of a training checkpoint (last.pt / best.pt) or of an export "
        "(with its .json beside it) on a data set's test split.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a training checkpoint (last.pt / best.pt; a run folder means its last.pt) or an export")
    p.add_argument("--dataset", default=None, help="data set (default: the one it was trained on)")
    p.add_argument("--data-root", dest="data_root", default=None, metavar="DIR",
                   help="data folder (default: where the training run's data set was read from; for another "
                        "--dataset, the run's --data-root)")
    p.add_argument("--download", action="store_true", help="download the data set if missing")
    p.add_argument("--test-samples", dest="test_samples", type=int, default=None, metavar="N",
                   help="evaluate on the first N test samples only (default: the whole test split, whatever the "
                        "training run's --test-samples)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: the cores idle when it starts)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    p.add_argument("--precise-bn", dest="precise_bn", type=int, default=None, metavar="N",
                   help=PRECISE_BN_HELP.replace("before evaluating", "of the checkpoint's data set before evaluating")
                   + " (default: the training run's --precise-bn, 0 for an export)")
    p.add_argument("--modules", action="store_true",
                   help="also the test accuracy of every local module's own aux net (a training checkpoint only): "
                        "which modules' features lag")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from . import distributed, runtime
    from .data import build_datasets, check_dataset_name, dataset_spec
    from .training import evaluate_backbone, evaluate_modules
    from .training.export import default_data_root, load_backbone

    try:
        ctx = distributed.init_from_env(args.device)
        distributed.cleanup(ctx)  # only the device is wanted: evaluation runs in one process
        device = ctx.device
        if device.type == "cpu":  # a team larger than the idle cores stalls (BENCHMARKS.md "CPU fast path")
            runtime.apply_threads(runtime.choose_threads(args.threads))
        args.checkpoint = _checkpoint_file(args.checkpoint)
        state, meta = load_backbone(args.checkpoint)
        dataset = check_dataset_name(args.dataset or meta["dataset"])  # in any case
        spec = dataset_spec(dataset)
        # everything that can refuse without the data does so before they are read, or downloaded
        _check_fits(meta, args.checkpoint, dataset, spec.num_classes, spec.in_channels)
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError(f"need --batch-size >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}")
        backbone = _backbone_for_eval(meta, state, args.checkpoint)
        local_model = _local_model_for_eval(args.checkpoint) if args.modules else None
        options = meta.get("data_options", {}) if dataset == meta["dataset"] else {}
        precise_bn = _precise_bn_batches(meta, args.precise_bn)
        train_set, test_set, info = build_datasets(
            dataset, args.data_root or default_data_root(meta, dataset), download=args.download,
            test_samples=args.test_samples, with_train=precise_bn > 0, **options
        )
        _check_fits(meta, args.checkpoint, dataset, info.num_classes, info.in_channels)  # an ImageFolder's classes
        # Said here, before the progress bar, rather than by the model in the middle of it; a resize of the run's
        # own data set is the run's own (mlaan train --image-size), not worth a warning
        if dataset != meta["dataset"] and backbone.resize_inputs and info.image_size != meta["image_size"]:
            print(f"mlaan: warning: {dataset}'s {info.image_size}x{info.image_size} images are resized to "
                  f"{meta['image_size']}x{meta['image_size']}, the size {meta['arch']} was trained on", file=sys.stderr)
        for net in (backbone, local_model.backbone if local_model is not None else None):
            _expect_resize(net)
        precise_bn_images = _precise_bn(backbone.to(device), meta, precise_bn, device, train_set) if precise_bn else 0
        if local_model is not None and precise_bn:  # the modules see the re-estimated backbone too
            local_model.backbone.load_state_dict(backbone.state_dict())
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    loader = DataLoader(test_set, batch_size=args.batch_size, num_workers=args.workers)
    result = evaluate_backbone(backbone.to(device), loader, device,
                               progress=f"evaluating on {len(test_set)} {info.name} test images")
    report = {
        "checkpoint": str(args.checkpoint),
        "arch": meta["arch"],
        "dataset": info.name,
        "test_images": result["count"],
        "test_accuracy": result["accuracy"],
        "test_error": 1.0 - result["accuracy"],
        "test_loss": result["loss"],
        "precise_bn": precise_bn,
        "precise_bn_images": precise_bn_images,  # fewer than precise_bn batches hold when the training set is small
    }
    if local_model is not None:
        report["module_accuracies"] = evaluate_modules(local_model.to(device), loader, device)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.checkpoint}: {meta['arch']} on {info.name} test ({result['count']} images): "
        f"accuracy {100 * report['test_accuracy']:.2f}%, error {100 * report['test_error']:.2f}%, "
        f"loss {report['test_loss']:.4f}"
        + (f" (precise BN on {precise_bn_images} training images)" if precise_bn else "")
    )
    for path, accuracies in (report.get("module_accuracies") or {}).items():
        if any(a is not None for a in accuracies[:-1]):
            shown = ", ".join("—" if a is None else f"{100 * a:.1f}" for a in accuracies)
            print(f"test accuracy % of each local module's {path} aux net (the last: the backbone): {shown}")
    return 0


def _check_fits(meta: Mapping[str, Any], path: str, dataset: str, classes: int | None, channels: int) -> None:
    """ValueError (one line) when the network of checkpoint ``path`` (described by ``meta``) cannot take data set
    ``dataset``'s ``channels``-channel images or its ``classes`` classes (None: known only once the data are read,
    not compared), naming the data sets it can take."""
    from .data import datasets_fitting

    if channels == meta["in_channels"] and classes in (None, meta["num_classes"]):
        return
    has = f"{classes} classes of " if classes is not None else ""
    # an ImageFolder's data set fits until read: after, it is not one of those it can take
    fitting = ", ".join(n for n in datasets_fitting(meta["num_classes"], meta["in_channels"]) if n != dataset)
    raise ValueError(
        f"checkpoint {path} was trained for {meta['num_classes']} classes of {meta['in_channels']}-channel images, "
        f"but {dataset} has {has}{channels}-channel images; data sets it can take: {fitting or 'none registered'}"
    )


def _backbone_for_eval(meta: Mapping[str, Any], state: Mapping[str, Any], path: str) -> Any:
    """The plain backbone ``meta`` describes, holding ``state`` (a training checkpoint's backbone, or an export's);
    ValueError naming ``path`` when the weights do not fit."""
    from . import models

    backbone = models.create(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    try:
        if backbone.source is not None and not any(k.startswith("blocks.") for k in state):
            backbone.source.load_state_dict(state)  # an export of a torchvision:/timm: model: its class's keys
        else:
            backbone.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {meta['arch']}: {_one_line(err)[:300]}") from err
    return backbone


def _expect_resize(backbone: Any) -> None:
    """No warning from ``backbone`` when it resizes batches (:attr:`mlaan.models.Backbone.warn_on_resize`): the
    command says so itself, or the resize is the training run's own (``mlaan train --image-size``)."""
    if backbone is not None:
        backbone.warn_on_resize = False


def _precise_bn_batches(meta: Mapping[str, Any], given: int | None) -> int:
    """``--precise-bn`` of eval/export: the value given, else what the training run's evaluations used (0 for an
    export, which already holds the statistics it was evaluated with). ValueError for a negative count."""
    from .training.config import check_precise_bn

    return check_precise_bn(meta.get("precise_bn", 0) if given is None else given)


def _precise_bn(backbone, meta: Mapping[str, Any], batches: int, device, train_set) -> int:
    """Re-estimate ``backbone``'s BatchNorm statistics in place on ``batches`` batches of ``train_set``, drawn as
    ``mlaan train --precise-bn`` drew them for the checkpoint's evaluation. Returns the images used."""
    from .training import precise_batchnorm

    return precise_batchnorm(backbone, train_set, batches, meta.get("batch_size", 128), device,
                      seed=meta.get("seed", 0), step=meta.get("step", 0))


def _local_model_for_eval(path: str):
    """The whole local model of a training checkpoint (``--modules``); ValueError for an export."""
    from .training import checkpoint as ckpt_io
    from .training.export import local_model_from_checkpoint

    obj = ckpt_io.load(path)
    if not ckpt_io.is_training_checkpoint(obj):
        raise ValueError(f"--modules needs a training checkpoint (last.pt / best.pt) with its aux nets; {path} "
                         "is an export of the backbone alone")
    return local_model_from_checkpoint(obj, path)


# --------------------------------------------------------------------------------------------------- export
def _add_export(subparsers) -> None:
    p = _add_parser(
        subparsers,
        "export",
        "write the plain backbone's state_dict",
        "Write the trained backbone's state_dict alone (no aux nets, no EMA twins) to --out, and FILE.json "
        "beside it with the architecture and normalisation. Load it with\n"
        "  net = mlaan.models.create(arch, num_classes=..., in_channels=..., image_size=...)\n"
        "  net.load_state_dict(torch.load(FILE, weights_only=True))\n"
        "or, for a torchvision:NAME / timm:NAME arch (the export holds that class's own keys), into\n"
        "  torchvision.models.NAME(num_classes=...) / timm.create_model(NAME, num_classes=...);\n"
        "FILE.json's load_with says which.",
    )
    p.epilog = ""  # the model is the checkpoint's: the catalogue of data sets, architectures and methods is not asked
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a training checkpoint (last.pt / best.pt; a run folder means its last.pt)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the state_dict (e.g. model.pt)")
    p.add_argument("--precise-bn", dest="precise_bn", type=int, default=None, metavar="N",
                   help="write BatchNorm statistics re-estimated on N training batches, as `mlaan eval --precise-bn`"
                        " (default: the training run's --precise-bn, so the export is the network its evaluation "
                        "measured)")
    p.add_argument("--data-root", dest="data_root", default=None, metavar="DIR",
                   help="data folder for --precise-bn (default: the training run's)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .training import checkpoint as ckpt_io
    from .training.export import export_backbone

    try:
        if ckpt_io.is_empty_path(args.out):  # Path("") is the current folder
            raise ValueError("--out is empty: give a file name, e.g. --out model.pt")
        args.checkpoint = _checkpoint_file(args.checkpoint)
        ckpt = ckpt_io.load_training_checkpoint(args.checkpoint)
        _replace_with_precise_bn(ckpt, args)
        out, meta = export_backbone(ckpt, args.out)
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    print(f"wrote {out} ({ckpt['arch']} backbone state_dict) and {meta}")
    return 0


def _replace_with_precise_bn(ckpt: dict, args: argparse.Namespace) -> None:
    """Put re-estimated BatchNorm statistics into ``ckpt``'s backbone state (``mlaan export --precise-bn``)."""
    import torch

    from . import models, runtime
    from .data import build_datasets
    from .training import export

    meta = export.describe_training_checkpoint(ckpt)
    batches = _precise_bn_batches(meta, args.precise_bn)
    if not batches:
        return
    runtime.apply_threads(runtime.choose_threads(None))
    backbone = models.create(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    backbone.load_state_dict(export.backbone_state(ckpt))
    _expect_resize(backbone)  # the run's own training set
    root = args.data_root or export.default_data_root(meta, meta["dataset"])
    train_set, _, _ = build_datasets(meta["dataset"], root, **meta["data_options"])
    _precise_bn(backbone, meta, batches, torch.device("cpu"), train_set)
    ckpt["model"].update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})


# ------------------------------------------------------------------------------------------------- download
def _add_download(subparsers) -> None:
    p = _add_parser(
        subparsers,
        "download",
        "fetch a torchvision data set into a data root",
        "Download a data set with torchvision into --data-root (what `make data` does for Fashion-MNIST "
        "when Debian's dataset-fashion-mnist cannot be installed).",
    )
    from .data import downloadable_datasets

    p.epilog = ""  # the catalogue of data sets, architectures and methods is not this command's: --dataset says
    p.add_argument("--dataset", default="fashion-mnist",
                   help=f"data set to fetch: {', '.join(downloadable_datasets())} (default: fashion-mnist)")
    p.add_argument("--data-root", dest="data_root", default="data", metavar="DIR",
                   help="folder to download into (default: data)")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from .data import check_dataset_name, dataset_folder, download_dataset

    try:
        args.dataset = check_dataset_name(args.dataset)  # in any case
        root = download_dataset(args.dataset, args.data_root)
    except (*INPUT_ERRORS, OSError) as err:
        raise CLIError(str(err)) from err
    where = dataset_folder(args.dataset, root)  # Fashion-MNIST: the folder its files are in
    elsewhere = where is not None and not Path(where).resolve().is_relative_to(Path(root).resolve())
    note = f" (an installed copy, found before {root}: nothing was downloaded; omit --data-root to use it)"
    print(f"{args.dataset}: ready in {where}{note if elsewhere else ''}")
    return 0


# ----------------------------------------------------------------------------------------------------- main
def build_parser() -> Parser:
    parser = Parser(
        prog="mlaan",
        description="Supervised local learning (DGL, InfoPro, AugLocal, BP) with MLAAN on top: "
        "train, evaluate and export.",
        epilog=_catalogue() + "\n\nStart with: mlaan train --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mlaan {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, action=_Commands)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_export(subparsers)
    _add_download(subparsers)
    bench = _bench_cli()
    if bench is not None:

        def contribute(commands: argparse._SubParsersAction) -> None:
            bench.register(commands)
            _add_catalogue(commands)  # contributed subcommands list the choices too

        if isinstance(getattr(bench, "COMMANDS", None), Mapping):
            subparsers.defer(bench.COMMANDS, contribute)  # built when used: their modules import torch
        else:
            contribute(subparsers)
    return parser


def _raw_description(formatter: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``formatter`` that keeps the epilog's line breaks (the catalogue is a list)."""
    if issubclass(formatter, argparse.RawDescriptionHelpFormatter):
        return formatter
    if formatter is argparse.HelpFormatter:
        return argparse.RawDescriptionHelpFormatter
    return type(f"Raw{formatter.__name__}", (formatter, argparse.RawDescriptionHelpFormatter), {})


def _add_catalogue(subparsers: argparse._SubParsersAction) -> None:
    """Give every subcommand parser without an epilog the list of data sets, architectures and methods."""
    for sub in subparsers.choices.values():
        if sub.epilog is None:
            sub.epilog = _catalogue()
            sub.formatter_class = _raw_description(sub.formatter_class)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_catalogue(action)


def _bench_cli():
    """``mlaan.bench.cli`` when that module exists (its subcommands join this command)."""
    try:
        from .bench import cli as bench_cli
    except ModuleNotFoundError as err:
        if err.name in ("mlaan.bench.cli", "mlaan.bench"):
            return None
        raise
    return bench_cli if hasattr(bench_cli, "register") else None


_OWN_COMMANDS = (cmd_train, cmd_eval, cmd_export, cmd_download)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _warnings_as_cli_lines():
            return int(args.func(args) or 0)
    except CLIError as err:
        if os.environ.get("MLAAN_DEBUG"):
            raise
        _print_error(err, err.per_rank)
        return err.code
    except INPUT_ERRORS as err:  # from contributed subcommands (ours raise CLIError)
        if os.environ.get("MLAAN_DEBUG") or args.func in _OWN_COMMANDS:
            raise
        _print_error(err, per_rank=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mlaan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by its reader (`mlaan train --print-config | head`): not an error here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not raise again
        return 141  # as a command killed by SIGPIPE


def _print_error(err: BaseException, per_rank: bool) -> None:
    """``mlaan: error: MESSAGE`` on stderr. Under torchrun, an error in the flags and files (``per_rank`` False) is
    the same for every process of a node, so the node's first process alone reports it; an error of one process
    (``per_rank``) is reported by that process. Each names its rank, but for bad input on rank 0."""
    if not _under_torchrun():
        print(f"mlaan: error: {_one_line(err)}", file=sys.stderr)
        return
    if not per_rank and not _first_on_node():
        return
    rank = os.environ.get("RANK", "0")
    where = f"rank {rank}: " if per_rank or rank != "0" else ""
    print(f"mlaan: error: {where}{_one_line(err)}", file=sys.stderr)


def _under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started."""
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1


def _first_on_node() -> bool:
    """Whether this process is the first torchrun started on this machine (or not under torchrun): the one that
    says what every process of the machine would say alike."""
    return not _under_torchrun() or os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def _warnings_as_cli_lines() -> Iterator[None]:
    """Python warnings that mlaan's own code raises (the API's, seen from the command line) printed as the
    command's other warnings are, ``mlaan: warning: MESSAGE``, without a source line and path; other libraries'
    warnings keep Python's format. Only the printing changes: ``warnings.catch_warnings(record=True)`` (and
    pytest) still record them."""
    package = str(Path(__file__).resolve().parent)
    python_format = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None) -> str:
        if str(Path(filename).resolve()).startswith(package):
            return f"mlaan: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = python_format


if __name__ == "__main__":
    sys.exit(main())
