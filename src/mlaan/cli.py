"""The ``mlaan`` command (also ``python -m mlaan``): train, eval, export, download, and any subcommands that
``mlaan.bench.cli.register(subparsers)`` contributes.

Bad input — an unknown data set, architecture or method, K out of range, a missing data root or checkpoint —
is reported as one line, ``mlaan: error: …``, on stderr with exit code 2, before anything is written.

This module parses and dispatches: ``mlaan train``'s flags come from the option declarations
(:mod:`mlaan.cli_flags`), what eval and export do is :mod:`mlaan.training.evaluation`'s and
:mod:`mlaan.training.export`'s, and the benchmarks' subcommands are built when used (:mod:`mlaan.cli_lazy`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import yaml

from .cli_flags import INPUT_ERRORS  # errors that mean "the input is wrong": one line, exit 2
from .cli_flags import NOT_CONFIG as _NOT_CONFIG
from .cli_lazy import DeferredCommands, add_contributed

EXIT_USAGE = 2


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
    from .cli_flags import add_train_flags

    p = _add_parser(
        subparsers,
        "train",
        "train a network with a local-learning method",
        "Train with a local-learning method and write metrics.jsonl, metrics.json, last.pt and best.pt to the "
        "output folder.\nOptions come from the defaults, then --config FILE.yaml (any option below, with "
        "underscores: batch_size: 1024), then the flags given here.",
    )
    add_train_flags(p)
    p.set_defaults(func=cmd_train)


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
    from .training.config import DERIVED_WHEN_UNSET, load_yaml, run_options_ignored
    from .training.run_folder import RUN_FILES

    try:
        config, _, path = resolve_run(config_file, overrides, resume, check_data=False)
        given = set(overrides) | set(load_yaml(config_file) if config_file is not None else {})
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    values = config.to_dict()
    ignored = (options_ignored(config.method, values) | run_options_ignored(values)) & set(values)
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
    from .training.config import PRECISE_BN_HELP

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
    from .training.evaluation import evaluate_prepared, evaluation_device, prepare_evaluation, report_lines

    try:
        device = evaluation_device(args.device, args.threads)
        args.checkpoint = _checkpoint_file(args.checkpoint)
        prepared = prepare_evaluation(
            args.checkpoint, device, dataset=args.dataset, data_root=args.data_root, download=args.download,
            test_samples=args.test_samples, batch_size=args.batch_size, workers=args.workers,
            precise_bn=args.precise_bn, modules=args.modules,
            warn=lambda message: print(f"mlaan: warning: {message}", file=sys.stderr))
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    report = evaluate_prepared(prepared, args.batch_size, args.workers)
    print(json.dumps(report, indent=2) if args.json else "\n".join(report_lines(report)))
    return 0


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
    from .training.evaluation import replace_with_precise_bn
    from .training.export import export_backbone

    try:
        if ckpt_io.is_empty_path(args.out):  # Path("") is the current folder
            raise ValueError("--out is empty: give a file name, e.g. --out model.pt")
        args.checkpoint = _checkpoint_file(args.checkpoint)
        ckpt = ckpt_io.load_training_checkpoint(args.checkpoint)
        replace_with_precise_bn(ckpt, args.precise_bn, args.data_root)
        out, meta = export_backbone(ckpt, args.out)
    except INPUT_ERRORS as err:
        raise CLIError(str(err)) from err
    print(f"wrote {out} ({ckpt['arch']} backbone state_dict) and {meta}")
    return 0


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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser,
                                       action=DeferredCommands)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_export(subparsers)
    _add_download(subparsers)
    add_contributed(subparsers, _catalogue)  # the benchmarks' subcommands, built when used
    return parser


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
    from .distributed.modes import env_world_size  # torch-free

    return env_world_size() > 1


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
