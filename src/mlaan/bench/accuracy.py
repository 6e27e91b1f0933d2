"""`mlaan bench accuracy`: train every method with every seed on one recipe, report mean ± std and paired gaps.

Each (method, seed) is one `mlaan train` subprocess writing to ``OUT/<method>/seed<N>/`` (``+`` spelled ``_``), its
log appended to ``OUT/logs/``. The folder remembers its recipe (``OUT/recipe.json``: arch, K, data, epochs,
optimiser, extra train flags); a later invocation with another recipe is refused, one with other methods or seeds
adds to it. Runs found finished are reused (so are the finished runs of an earlier report of the same recipe given
with ``--merge``: a comparison moved to another machine trains only what it lacks), runs found unfinished (a
``last.pt`` without ``metrics.json``) or stopped (a ``metrics.json`` of a run that ended on ``--max-steps`` before
its schedule's end) are continued with ``--resume`` — so a comparison longer than one sitting is completed by
running the same command again. "Finished" is :func:`mlaan.training.metrics_log.run_state`'s, the one definition
`mlaan report` and a resume use too: only finished runs enter the tables; ``--max-steps`` is refused among the
flags of a run (``--train-arg``, ``--arm``), and every run's `mlaan train` command line is resolved as
``--print-config`` resolves it before the first run starts (:func:`check_commands`): one that would be refused is
refused then, not once the runs before it have trained. ``--jobs N`` trains N runs at once (one thread each unless
``--threads``); a run that another process is training is left to it (each harness claims a run's folder before
starting it, :class:`HarnessClaim`, and a plain `mlaan train` holds the folder's own lock), so several invocations
of one command on one folder share the work; an invocation that ends with such a run still unfinished exits with 75
(sysexits' EX_TEMPFAIL), not 0, so that a script does not take its report for the whole comparison.
SIGINT, SIGTERM or SIGHUP to the harness (or a run stopped by a signal) stops the comparison: every running run is
passed the signal at once, saves its checkpoint at a step boundary and exits, no further run starts, and the
harness waits for its runs, then exits with 128 + the signal number; the runs sit in their own process group, so
that a Ctrl-C reaches each of them once, through the harness. Should the harness be killed outright, the kernel
sends its runs SIGTERM (Linux), so they save and exit rather than train on, unwatched. The report
(``accuracy.md``, ``accuracy.json``, ``curves.png``) covers every run in the folder: mean ± std of the final test
error per method, each seed, and Δ vs BP and vs the base method as paired per-seed differences
(:mod:`mlaan.bench.seeds`).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import runtime
from ..atomic import atomic_write_text
from ..data import check_dataset_name
from ..models import max_local_modules
from ..training import metrics_log
from ..training.safety import STOP_SIGNALS, HarnessClaim, RunFolderLock, StopSignals, signal_when_parent_dies
from . import common, report, seeds

ACCURACY_METHODS = ("bp", "dgl", "dgl+mlaan", "infopro", "infopro+mlaan", "dgl+mlm", "dgl+lam")
# The settings that make runs comparable; runs in one folder must share them.
RECIPE_KEYS = ("arch", "k", "dataset", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
               "train_samples", "test_samples", "train_arg", "image_size")


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: a method, optionally with extra `mlaan train` flags (``--arm``/``--vary``).

    ``label`` is ``"dgl+mlaan"`` for a plain method and ``"dgl+mlaan window=3"`` for a variant of it."""

    method: str
    variant: str = ""
    flags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.method} {self.variant}" if self.variant else self.method

    @property
    def folder_name(self) -> str:
        name = self.method.replace("+", "_")
        return f"{name}@{self.variant.replace(' ', '_').replace('/', '_')}" if self.variant else name


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    """Where one (arm, seed) run lives."""
    return out / arm.folder_name / f"seed{seed}"


def parse_arms(methods: list[str], arm_texts: list[str], vary_texts: list[str]) -> list[Arm]:
    """Every method plain, then with each ``--arm LABEL=FLAGS`` and each one-at-a-time ``--vary OPTION=V1,V2``
    value (a value equal to the option's default is the plain method itself and adds nothing, and so does an
    option the method does not read: ``--vary window=2,3`` varies dgl+mlaan, not bp)."""
    from ..engine.options import options_unused_by
    from ..training.config import TrainConfig, coerce

    variants: list[tuple[str, tuple[str, ...], str | None]] = []  # label, flags, the option --vary varies
    for text in arm_texts:
        label, sep, flags = text.partition("=")
        if not sep or not label.strip() or not flags.strip():
            raise ValueError(f"--arm {text!r}: expected LABEL='--flag value ...', e.g. --arm \"bf16=--amp\"")
        variants.append((label.strip(), tuple(flags.split()), None))
    defaults = TrainConfig()
    for text in vary_texts:
        option, sep, values = text.partition("=")
        name = option.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--vary {text!r}: expected OPTION=V1,V2, e.g. --vary window=2,3")
        if not hasattr(defaults, name):
            raise ValueError(f"--vary: unknown option {option.strip()!r} (an option of `mlaan train`)")
        for value in (v.strip() for v in values.split(",") if v.strip()):
            if coerce(name, value) == getattr(defaults, name):
                continue
            flag = "--" + name.replace("_", "-")
            shown = coerce(name, value) if isinstance(coerce(name, value), str) else value  # MLP -> mlp, 0.990 kept
            variants.append((f"{name}={shown}", _flag(flag, coerce(name, value)), name))
    return [Arm(m) for m in methods] + [Arm(m, label, flags) for m in methods for label, flags, option in variants
                                        if option not in options_unused_by(m)]


def _flag(flag: str, value: object) -> tuple[str, ...]:
    if isinstance(value, bool):
        return (flag if value else "--no-" + flag[2:],)
    return (flag, *(str(v) for v in value)) if isinstance(value, tuple) else (flag, str(value))


def train_command(args: argparse.Namespace, arm: Arm, seed: int, folder: Path, threads: int | None) -> list[str]:
    """The `mlaan train` command line of one run (every run gets the same recipe, then its arm's flags)."""
    method = arm.method
    k = common.model_k(method, args.k)
    cmd = [
        sys.executable, "-m", "mlaan", "train",
        "--method", method, "--arch", args.arch, "--local-modules", str(k), "--dataset", args.dataset,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--weight-decay", str(args.weight_decay), "--warmup-epochs", str(args.warmup_epochs),
        "--seed", str(seed), "--output-dir", str(folder),
    ]
    if args.train_samples and args.train_samples > 0:
        cmd += ["--train-samples", str(args.train_samples)]
    if args.test_samples:
        cmd += ["--test-samples", str(args.test_samples)]
    if getattr(args, "image_size", None):
        cmd += ["--image-size", str(args.image_size)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.device:
        cmd += ["--device", args.device]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if args.save_every:
        cmd += ["--save-every", str(args.save_every)]
    for extra in args.train_arg or []:
        cmd += extra.split()
    return cmd + list(arm.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(ACCURACY_METHODS), help="comma-separated methods")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every method is trained with each")
    p.add_argument("--seed", type=int, default=None, help="one seed (the same as --seeds N)")
    p.add_argument("--arch", default="resnet32", help="architecture of every run (`mlaan train --help` lists them)")
    p.add_argument("--k", type=int, default=16, help="local modules K (end-to-end methods: 1)")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="input side every run trains at, passed to `mlaan train` (default: the arch's own; e.g. "
                        "--arch timm:vit_tiny_patch16_224 --image-size 64)")
    p.add_argument("--dataset", default="fashion-mnist", help="data set of every run")
    p.add_argument("--epochs", type=int, default=3, help="epoch budget of every run")
    p.add_argument("--batch-size", type=int, default=128, help="training batch of every run")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov, cosine)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay of every run")
    p.add_argument("--warmup-epochs", type=float, default=0.2, help="linear warm-up before the cosine decay")
    p.add_argument("--train-samples", type=int, default=15000,
                   help="train on the first N training images (0: all); the default budget, 3 epochs of 15000 "
                        "images for 7 methods, took 50 minutes on 2 CPU cores (BENCHMARKS.md)")
    p.add_argument("--test-samples", type=int, default=None, help="test on the first N test images")
    p.add_argument("--data-root", default=None, help="data folder passed to `mlaan train`")
    p.add_argument("--device", default=None, help="auto, cpu or cuda, passed to `mlaan train`")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: 1 per run with --jobs > 1, else the idle cores)")
    p.add_argument("--save-every", type=int, default=100,
                   help="each run saves last.pt every N steps, so an interrupted run loses at most N steps")
    p.add_argument("--train-arg", action="append", metavar="'--flag value'",
                   help="extra argument(s) passed to every `mlaan train` (repeatable; part of the recipe); a "
                        "lone flag takes '=': --train-arg=--data-on-device")
    p.add_argument("--arm", action="append", default=[], metavar="LABEL='--flag value'",
                   help="also train every method with these extra flags, reported as 'METHOD LABEL' with its "
                        "paired difference to the plain method (repeatable), e.g. --arm \"bf16+cl=--amp "
                        "--channels-last\"")
    p.add_argument("--vary", action="append", default=[], metavar="OPTION=V1,V2",
                   help="one option at a time: an arm for each value that differs from the option's default, "
                        "e.g. --vary window=2,3 --vary aux_head=linear,mlp (repeatable; a method that does not read "
                        "the option is not varied)")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report of what the folder holds (finished runs; unfinished ones "
                        "are listed with their progress)")
    p.add_argument("--modules", action="store_true",
                   help="also the test accuracy of each local module's aux net, for every finished run (`mlaan "
                        "eval --modules` of its last.pt, measured once and kept as modules.json in the run's "
                        "folder): a table and a panel of curves.png, to see which modules lag")
    p.add_argument("--merge", action="append", default=[], metavar="REPORT",
                   help="also report the finished runs of an earlier report of the same recipe (its "
                        "accuracy.json, or the folder holding it), e.g. runs trained on another machine or in a "
                        "folder since lost (repeatable); a finished run of the output folder wins over a merged "
                        "one with the same method and seed, and a merged one over an unfinished run there")
    p.add_argument("--output-dir", default=None, help="(default: runs/bench-accuracy)")


def _recipe(args: argparse.Namespace) -> dict:
    recipe = {key: getattr(args, key, None) for key in RECIPE_KEYS}
    if recipe["image_size"] is None:  # the arch's own size: recipes written before --image-size read the same
        del recipe["image_size"]
    return recipe


def check_recipe(out: Path, recipe: dict) -> None:
    """Record the folder's recipe, or refuse (ValueError) one that differs from the recorded one while a run of
    that recipe is there (a recipe whose every run failed before saving anything is simply replaced)."""
    path = out / "recipe.json"
    if not path.exists() or not any(_state(folder) != "new" for folder in out.glob("*/seed*")):
        common.write_json(path, recipe)
        return
    differ = recipe_differences(json.loads(path.read_text()), recipe)
    if differ:
        raise ValueError(f"{out} holds runs of another recipe ({'; '.join(differ)}): use the same settings to add "
                         "to it, or another --output-dir")


def recipe_differences(recorded: dict, recipe: dict) -> list[str]:
    """``"epochs: 15 there, 3 now"`` for each recipe key whose value differs (a key missing: None)."""
    return [f"{k}: {recorded.get(k)!r} there, {recipe.get(k)!r} now" for k in RECIPE_KEYS
            if recorded.get(k) != recipe.get(k)]


def _check(args: argparse.Namespace) -> tuple[list[Arm], list[int]]:
    methods = parse_arms(common.parse_methods(args.methods), args.arm, args.vary)
    seed_list = [args.seed] if args.seed is not None else _parse_seeds(args.seeds)
    args.arch = common.check_arch(args.arch)  # as recorded: the registered spelling
    args.dataset = check_dataset_name(args.dataset)  # likewise
    for name, value in (("--k", args.k), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--jobs", args.jobs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if getattr(args, "image_size", None) is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be at least 1, got {args.image_size}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.lr <= 0 or args.weight_decay < 0:
        raise ValueError(f"need --lr > 0 and --weight-decay >= 0, got {args.lr}, {args.weight_decay}")
    for extra in args.train_arg or []:
        _check_run_flags(extra.split(), f"--train-arg {extra!r}", HARNESS_OWNED)
    for arm in methods:
        _check_run_flags(list(arm.flags), f"--arm/--vary {arm.variant!r}", RUN_IDENTITY)
    limit = max_local_modules(args.arch)
    if args.k > limit and any(common.model_k(arm.method, args.k) > 1 for arm in methods):
        raise ValueError(f"--k {args.k} is too large for {args.arch} (allowed 1 to {limit}: its residual blocks + "
                         "the stem's module)")
    return methods, seed_list


def check_commands(args: argparse.Namespace, arms: list[Arm], seed_list: list[int]) -> None:
    """Every run's whole `mlaan train` command line (:func:`train_command`: the recipe, ``--train-arg``, its arm's
    flags) resolved as ``mlaan train --print-config`` resolves it (:func:`mlaan.cli_flags.resolve_train_args`), before
    anything is written or trained: ValueError, one line naming the arm, for one that `mlaan train` would refuse
    (``--vary lam_trunk=twins`` with ``--train-arg=--ema-update last``), which would otherwise fail only once the
    runs before it had trained. An arm's seeds differ only by ``--seed`` (and folder): each arm is resolved once,
    with the largest seed."""
    from ..cli_flags import INPUT_ERRORS, resolve_train_args

    folder = Path(args.output_dir) if args.output_dir else Path("runs") / "bench-accuracy"
    seed = max(seed_list)
    for arm in arms:
        cmd = train_command(args, arm, seed, run_dir(folder, arm, seed), run_threads(args))
        try:
            resolve_train_args(cmd[cmd.index("train") + 1:])
        except INPUT_ERRORS as err:
            flags = f" (its flags: {' '.join(arm.flags)})" if arm.flags else ""
            raise ValueError(f"{arm.label}{flags}: `mlaan train` refuses its command line: "
                             f"{' '.join(str(err).split())}; nothing was trained") from None


def _parse_seeds(text: str) -> list[int]:
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"--seeds: {item!r} is not a non-negative integer (e.g. --seeds 0,1,2)")
        values.append(int(item))
    if not values:
        raise ValueError("--seeds: no seed given (e.g. --seeds 0,1,2)")
    return list(dict.fromkeys(values))


def _state(folder: Path) -> str:
    """``"finished"``, ``"stopped"``, ``"unfinished"`` or ``"new"``: :func:`mlaan.training.metrics_log.run_state`."""
    return metrics_log.run_state(folder)


# The `mlaan train` options the harness sets for every run from its own flags (the recipe, the seed, where and
# how a run goes), by option name: an extra flag setting one too would win (the last one does) and a row labelled
# bp could be another method's run.
HARNESS_OWNED = {"method": "--methods", "arch": "--arch", "local_modules": "--k", "dataset": "--dataset",
                 "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "weight_decay": "--weight-decay",
                 "warmup_epochs": "--warmup-epochs", "seed": "--seeds", "output_dir": "--output-dir",
                 "train_samples": "--train-samples", "test_samples": "--test-samples", "image_size": "--image-size",
                 "data_root": "--data-root", "device": "--device", "threads": "--threads",
                 "save_every": "--save-every", "resume": "--force (a finished run) or nothing (the rest resume)",
                 "overwrite": "--force"}
# What an arm may not change either: which method and seed its row reports, and where its run goes. (The
# recipe's own flags it may: an arm "lr0.05=--lr 0.05" is a variant, reported under its label.)
RUN_IDENTITY = ("method", "seed", "output_dir", "resume", "overwrite")


def _check_run_flags(flags: list[str], where: str, owned: Iterable[str]) -> None:
    """ValueError for extra `mlaan train` flags (``--train-arg``: ``owned`` is :data:`HARNESS_OWNED`; an arm's:
    :data:`RUN_IDENTITY`) that set one of ``owned`` (under any spelling: ``-K``, an abbreviation), or
    ``--max-steps``: every run trains its whole schedule (a run stopped early is not finished, and would be
    continued by every invocation without ever finishing). Flags `mlaan train` would refuse are left to
    :func:`check_commands`."""
    from ..cli_flags import INPUT_ERRORS, train_options_given

    try:
        given = train_options_given(flags)
    except INPUT_ERRORS:
        return
    if "max_steps" in given:
        raise ValueError(f"{where}: --max-steps is not allowed in `bench accuracy`, whose runs each train their "
                         "whole schedule (a run stopped early is not compared); shorten the recipe with --epochs "
                         "or --train-samples")
    for name in (n for n in owned if n in given):
        raise ValueError(f"{where}: sets {name}, which `bench accuracy` sets for every run itself (so a run could "
                         f"differ from what its row says): use {HARNESS_OWNED[name]} instead")


def _progress(folder: Path, epochs: int) -> str:
    """How far an unfinished run has come: its last logged epoch and test accuracy, or that it has not started."""
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    holder = (HarnessClaim.holder(folder) or RunFolderLock.holder(folder)) if folder.exists() else None
    running = f", being trained by {holder}" if holder else ""
    if not lines:
        started = _state(folder) in ("unfinished", "stopped") or holder
        return ("unfinished, no epoch logged yet" if started else "not started") + running
    last = json.loads(lines[-1])
    state = "stopped by --max-steps" if _state(folder) == "stopped" else "unfinished"
    return (f"{state}, {last['epoch'] - (0 if last.get('complete', True) else 1)} of "
            f"{common.plural(epochs, 'epoch')} "
            f"(step {last.get('step', '?')}), test accuracy {100 * last['test_accuracy']:.2f}% so far{running}")


def start_process(cmd: list[str], log) -> subprocess.Popen:
    """Start one `mlaan train` with its output going to the open file ``log``, in a process group of its own:
    a terminal's Ctrl-C reaches the harness alone, which passes it on once (a second signal would stop a run
    at once instead of at a step boundary). Should the harness itself be killed (SIGKILL, the OOM killer), the
    run is sent SIGTERM and saves (Linux; :func:`signal_when_parent_dies`)."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=signal_when_parent_dies(signal.SIGTERM))


class _Job:
    """One `mlaan train` subprocess, the harness's claim on its folder, where its log goes, and the stop signals
    passed to it."""

    def __init__(self, arm: Arm, seed: int, cmd: list[str], log_path: Path, claim: HarnessClaim) -> None:
        self.arm, self.seed, self.cmd, self.log_path, self.claim = arm, seed, cmd, log_path, claim
        self.signalled: list[int] = []
        self.log = open(log_path, "a")
        self.log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd[1:])}\n")
        self.log.flush()
        self.started = time.perf_counter()
        self.proc = start_process(cmd, self.log)

    @property
    def name(self) -> str:
        return f"{self.arm.label} seed {self.seed}"

    def stop(self, signum: int) -> None:
        """Pass a stop signal on: the run saves at a step boundary and exits (a second one stops it at once)."""
        self.signalled.append(signum)
        self.proc.send_signal(signum)

    def close(self) -> None:
        self.log.close()
        self.claim.release()


class _StopForwarding(StopSignals):
    """While the harness trains: SIGINT, SIGTERM and SIGHUP (unless ignored, as under ``nohup``) are passed at once
    to every running run, from the handler itself, so that a quick second signal cannot beat them to it; SIGHUP
    is passed as SIGTERM. ``received``: the first signal's number. Unlike a training run's :class:`StopSignals`,
    every signal is handled this way, so the harness keeps running until its runs have exited and none is left
    behind, orphaned."""

    def __init__(self, running: list[_Job]) -> None:
        super().__init__(s for s in (*STOP_SIGNALS, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN)
        self.running = running

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        for job in list(self.running):
            job.stop(self.passed_on(signum))

    @staticmethod
    def passed_on(signum: int) -> int:
        """What a run is sent for ``signum``."""
        return signal.SIGTERM if signum == signal.SIGHUP else signum


def run_threads(args: argparse.Namespace) -> int | None:
    """The ``--threads`` each run gets: as given, else 1 when runs share the machine, else None (each run takes
    the cores idle when it starts, ``mlaan train``'s default)."""
    return args.threads if args.threads is not None else (1 if args.jobs > 1 else None)


def train_all(args: argparse.Namespace, plan: list[tuple[Arm, int]], out: Path) -> tuple[list[str], int | None]:
    """Train (or continue) every planned run, ``args.jobs`` at a time. Returns the failed runs' names and the
    stop signal's number (None if none came): a signal to the harness, or a run that exited stopped by one,
    is passed to every running run, and no further run is started."""
    threads = run_threads(args)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    queue, running, failures = list(plan), [], []
    with _StopForwarding(running) as stop:
        while queue or running:
            while queue and len(running) < args.jobs and stop.received is None:
                job = _start(args, *queue.pop(0), out, threads, logs)
                if job is not None:
                    running.append(job)
            time.sleep(1.0)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                job.close()
                failures += _finished(job, out)
                signum = job.proc.returncode - 128
                if stop.received is None and signum in STOP_SIGNALS:
                    print(f"  {job.name} was stopped by {StopSignals.name(signum)}: stopping the comparison",
                          flush=True)
                    stop.received = signum
            if stop.received is not None:
                for job in running:  # the rest, after a run was stopped; or one started as the signal came in
                    if not job.signalled:
                        job.stop(stop.passed_on(stop.received))
                if queue:
                    print(f"  stopping ({StopSignals.name(stop.received)}): {len(running)} running run(s) save "
                          f"their checkpoint, {len(queue)} not started", flush=True)
                    queue.clear()
    return failures, stop.received


def _start(args: argparse.Namespace, arm: Arm, seed: int, out: Path, threads: int | None,
           logs: Path) -> _Job | None:
    """Start (or continue) one run; None if it is finished, or another process is training it."""
    folder = run_dir(out, arm, seed)
    claim = HarnessClaim(folder)
    holder = claim.try_acquire()  # another harness on this folder started it
    if holder is None:
        holder = RunFolderLock.holder(folder)  # a `mlaan train` of its own
    if holder is not None:
        claim.release()
        print(f"  {arm.label} seed {seed}: being trained by {holder}, left to it", flush=True)
        return None
    state = _state(folder)
    if state == "finished" and not args.force:
        claim.release()
        print(f"  {arm.label} seed {seed}: finished meanwhile, kept", flush=True)
        return None
    cmd = train_command(args, arm, seed, folder, threads)
    resume = state in ("unfinished", "stopped")  # stopped: ended on --max-steps before its end, trains on
    cmd += ["--resume"] if resume else (["--overwrite"] if args.force else [])
    (folder / MODULES_FILE).unlink(missing_ok=True)  # measured on the run being replaced
    print(f"  {arm.label} seed {seed}: {'continuing' if resume else 'starting'}: "
          f"{' '.join(cmd[3:])}", flush=True)
    common.write_json(folder.parent / "arm.json", asdict(arm) | {"label": arm.label})
    return _Job(arm, seed, cmd, logs / f"{arm.folder_name}-seed{seed}.log", claim)


def _finished(job: _Job, out: Path) -> list[str]:
    """Report how a run ended; returns ``[its name]`` if it failed."""
    final = run_dir(out, job.arm, job.seed) / "metrics.json"
    code, seconds = job.proc.returncode, time.perf_counter() - job.started
    if code - 128 in STOP_SIGNALS and (final.parent / "last.pt").exists():
        print(f"  {job.name}: stopped by {StopSignals.name(code - 128)}, checkpoint saved ({seconds:.0f}s)",
              flush=True)
        return []
    if code < 0 and -code in job.signalled:  # stopped at once: a second signal, or one before it could save
        saved = (final.parent / "last.pt").exists()
        when = "before a step boundary: it continues from its last periodic save" if saved else "while starting up"
        print(f"  {job.name}: stopped by {StopSignals.name(-code)} {when}", flush=True)
        return []
    if code != 0 or not final.exists():
        tail = job.log_path.read_text().strip().splitlines()[-3:]
        print(f"  {job.name}: FAILED (exit {code}): {' | '.join(tail)}", flush=True)
        return [job.name]
    summary = json.loads(final.read_text())
    if not metrics_log.summary_finished(summary):  # ended on a --max-steps that came in some other way
        steps, planned = metrics_log.stopped_early(summary) or (None, None)
        print(f"  {job.name}: FAILED: ended at step {steps} of {planned}, before the end of its schedule "
              "(--max-steps?); not compared", flush=True)
        return [job.name]
    accuracy = summary["test_accuracy"]
    print(f"  {job.name}: test accuracy {100 * accuracy:.2f}% ({seconds:.0f}s)", flush=True)
    return []


MODULES_FILE = "modules.json"


def run_eval(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run one `mlaan eval`, its output captured."""
    return subprocess.run(cmd, capture_output=True, text=True)


def measure_modules(out: Path, args: argparse.Namespace) -> list[str]:
    """``--modules``: for every finished run in ``out`` without a ``modules.json``, its per-module test accuracies
    from ``mlaan eval --checkpoint RUN/last.pt --modules --json``; returns the runs it failed for."""
    failures = []
    for folder in sorted(f for f in out.glob("*/seed*") if _state(f) == "finished"):
        target = folder / MODULES_FILE
        if target.exists() or not (folder / "last.pt").exists():
            continue
        cmd = [sys.executable, "-m", "mlaan", "eval", "--checkpoint", str(folder / "last.pt"), "--modules", "--json"]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        if args.device:
            cmd += ["--device", args.device]
        print(f"  {folder.relative_to(out)}: per-module test accuracy (mlaan eval --modules)", flush=True)
        done = run_eval(cmd)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [""])[-1]
            print(f"  {folder.relative_to(out)}: mlaan eval FAILED (exit {done.returncode}): {why}", flush=True)
            failures.append(str(folder.relative_to(out)))
            continue
        atomic_write_text(done.stdout, target)
    return failures


REPORT_RUN_KEYS = ("label", "method", "variant", "seed", "path", "finished", "test_error", "test_accuracy",
                   "best_accuracy", "wall_time", "steps", "epochs", "module_accuracies")


def load_merged(paths: list[str], recipe: dict) -> list[dict]:
    """``--merge``: each earlier report (``accuracy.json``, or a folder holding one) as ``{"report": path,
    "machine": its machine line, "runs": its finished runs}``; ValueError (one line, naming the report) for a
    missing or unreadable file, one that is not such a report, or a report of another recipe (the keys of
    :data:`RECIPE_KEYS` that differ are named)."""
    merged = []
    for text in paths:
        path = Path(text)
        path = path / "accuracy.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"--merge {text}: no such report (give an accuracy.json written by `mlaan bench "
                             "accuracy`, or the folder holding one)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"--merge {text}: cannot read it as a report ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("recipe"), dict) or not isinstance(
                data.get("runs"), list):
            raise ValueError(f"--merge {text}: not an accuracy.json of `mlaan bench accuracy` (no recipe and runs)")
        differ = recipe_differences(data["recipe"], recipe)
        if differ:
            raise ValueError(f"--merge {text}: a report of another recipe ({'; '.join(differ)}); only runs of the "
                             "same recipe can be compared")
        runs = [_merged_run(run, text, path) for run in data["runs"] if isinstance(run, dict) and run.get("finished")]
        machine = str(data.get("machine") or "not recorded")
        # a report that merged others: where its merged runs were trained goes with them
        machine += "".join(f"; {', '.join(map(str, m.get('runs', [])))} from {m.get('report')}, machine: "
                           f"{m.get('machine')}" for m in data.get("merged") or [] if isinstance(m, dict))
        merged.append({"report": str(path), "machine": machine, "runs": runs})
    return merged


def _merged_run(run: dict, text: str, path: Path) -> dict:
    """One finished run of a merged report, its keys checked (ValueError naming the report and the value) and
    completed as the report's own runs have them (an int seed, a label, a variant), with its ``source``."""
    method, seed = run.get("method"), run.get("seed")
    if not isinstance(method, str) or not str(seed).isdigit() or isinstance(seed, bool):
        raise ValueError(f"--merge {text}: a run with method {method!r} and seed {seed!r} (expected a method name "
                         "and a non-negative integer seed)")
    if not isinstance(run.get("test_error"), (int, float)) or not isinstance(run.get("epochs", []), list):
        raise ValueError(f"--merge {text}: {method} seed {seed} has no test_error, or epochs that are not a list")
    variant = run.get("variant") or ""
    return dict(run, seed=int(seed), variant=variant, label=run.get("label") or f"{method} {variant}".strip(),
                epochs=run.get("epochs", []), source=str(path))


def _merge_runs(own: list[dict], merged: list[dict]) -> list[dict]:
    """The report's runs: the output folder's finished runs, then each merged report's runs of a method and seed
    that none before it has, then the folder's unfinished runs of the rest; in the comparison's order."""
    runs = [r for r in own if r["finished"]]
    seen = {(r["label"], int(r["seed"])) for r in runs}
    for earlier in merged:
        for run in earlier["runs"]:
            key = (run.get("label", run["method"]), int(run["seed"]))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    runs += [r for r in own if not r["finished"] and (r["label"], int(r["seed"])) not in seen]
    return _in_order(runs)


def merged_finished(merged: list[dict], arm: Arm, seed: int) -> str | None:
    """The merged report that holds a finished run of ``arm`` with ``seed``, if any."""
    for earlier in merged:
        if any(r.get("label", r["method"]) == arm.label and int(r["seed"]) == seed for r in earlier["runs"]):
            return earlier["report"]
    return None


def _in_order(runs: list[dict]) -> list[dict]:
    order = {m: i for i, m in enumerate(ACCURACY_METHODS)}
    return sorted(runs, key=lambda r: (order.get(r["method"], len(order)), r["method"], r.get("variant", ""),
                                       int(r["seed"])))


def collect_runs(out: Path) -> list[dict]:
    """Every run folder under ``out`` (``<method>/seed<N>``), loaded, with its seed."""
    runs = []
    for folder in sorted(out.glob("*/seed*")):
        if folder.is_dir() and ((folder / "metrics.jsonl").exists() or (folder / "metrics.json").exists()):
            run = report.load_run(folder)
            run["seed"] = int(folder.name[len("seed"):])
            arm_file = folder.parent / "arm.json"
            arm = json.loads(arm_file.read_text()) if arm_file.exists() else {}
            run["variant"] = arm.get("variant", "")
            run["label"] = arm.get("label", run["method"])
            measured = folder / MODULES_FILE
            run["module_accuracies"] = (json.loads(measured.read_text()).get("module_accuracies")
                                        if measured.exists() else None)
            runs.append(run)
    return _in_order(runs)


def write_report(out: Path, title: str, machine: str, recipe: dict, merged: list[dict] | None = None) -> dict:
    """accuracy.md, accuracy.json and curves.png over every run in ``out`` and the finished runs of the
    ``merged`` reports (:func:`load_merged`) that ``out`` has no run of (no curves.png without matplotlib, an
    optional extra: one line on stderr says so)."""
    merged = merged or []
    runs = _merge_runs(collect_runs(out), merged)
    finished = [r for r in runs if r["finished"]]
    summary = seeds.summarise(finished)
    md = seeds.table(summary)
    modules_md = seeds.module_table(finished)
    unfinished = [f"{r['label']} seed {r['seed']} (" + (
        f"stopped by --max-steps at step {r['steps']} of {r.get('planned_steps') or '?'}" if r.get("stopped")
        else f"epoch {len(r['epochs'])}/{recipe['epochs']}") + ")" for r in runs if not r["finished"]]
    plots = common.plots_or_note()
    if plots:
        seeds.plot(finished or runs, out / "curves.png", title)
    lines = [f"# {title}", "", f"Machine: {machine}.", ""]
    for source in _merged_sources(runs, merged):
        lines += [f"Merged from {source['report']} ({', '.join(source['runs'])}), machine: {source['machine']}.", ""]
    lines += [md, "",
             "Test error at the end of training, in %; Δ in percentage points, negative is better, the mean ± "
             "sample std of per-seed differences over the seeds both methods finished (n).", ""]
    if unfinished:
        lines += ["Not finished yet (run the same command again to continue): " + ", ".join(unfinished) + ".", ""]
    standing = seeds.interim(runs)
    if standing:
        lines += ["Where the unfinished runs stand: test error (%) at each one's last complete epoch against the "
                  "finished runs of the same seed at the same epoch (the same recipe, so the same point of the "
                  "learning-rate schedule); an interim reading, not a result.", "", seeds.interim_table(standing), ""]
    if modules_md:
        lines += ["Test accuracy (%) of each local module's main aux net (the cascaded one under MLM, else its "
                  "own; the last module is the network itself), mean over the seeds measured (`--modules`). "
                  "— : under MLM the first module has no cascade of its own; it learns through the second "
                  "module's (its independent aux net, weighted w_ind, 0.001 by default, stays near chance).", "",
                  modules_md, ""]
    if plots:
        lines += ["![test error per epoch and per-module aux loss](curves.png)"]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    data = {
        "machine": machine,
        "recipe": recipe,
        "summary": summary,
        "unfinished": unfinished,
        "interim": standing,
        "merged": _merged_sources(runs, merged),
        "runs": [{k: r.get(k) for k in REPORT_RUN_KEYS} | ({"source": r["source"]} if "source" in r else {})
                 for r in runs],
    }
    common.write_json(out / "accuracy.json", data)
    names = ("accuracy.md", "accuracy.json") + (("curves.png",) if plots else ())
    return {"table": md, "files": [str(out / n) for n in names]}


def _merged_sources(runs: list[dict], merged: list[dict]) -> list[dict]:
    """Each merged report that gave the report a run: its path, machine line and the runs it gave."""
    sources = []
    for earlier in merged:
        given = [f"{r['label']} s{r['seed']}" for r in runs if r.get("source") == earlier["report"]]  # labelled
        if given:
            sources.append({"report": earlier["report"], "machine": earlier["machine"], "runs": given})
    return sources


def run(args: argparse.Namespace) -> int:
    arms, seed_list = _check(args)
    if not args.report_only:
        check_commands(args, arms, seed_list)
    recipe = _recipe(args)
    merged = load_merged(args.merge, recipe)
    out = common.output_dir(args.output_dir, "accuracy")
    check_recipe(out, recipe)
    threads = run_threads(args)
    per_run = (f"{common.plural(threads, 'thread')} per run" if threads is not None
               else "threads per run: the cores idle at its start")
    machine = common.machine_description(per_run) + f"; code {common.code_version()}"
    if args.device in (None, "auto", "cpu"):
        machine += f"; {runtime.cpu_bf16() or 'no bf16'} CPU"
    print(f"mlaan bench accuracy on {machine}: {', '.join(a.label for a in arms)} x seeds "
          f"{', '.join(map(str, seed_list))}; "
          f"{args.arch} K={args.k}, {args.dataset}, {common.plural(args.epochs, 'epoch')}, "
          f"batch {args.batch_size}, lr {args.lr}, {args.jobs} at a time -> {out}", flush=True)
    plan = []
    for seed in seed_list:  # seed-major: every method's first seed is done before any second seed
        for arm in arms:
            if args.force:
                plan.append((arm, seed))
            elif _state(run_dir(out, arm, seed)) == "finished":
                print(f"  {arm.label} seed {seed}: finished earlier, kept", flush=True)
            elif source := merged_finished(merged, arm, seed):
                print(f"  {arm.label} seed {seed}: finished in {source} (--merge), kept", flush=True)
            else:
                plan.append((arm, seed))
    if args.report_only:
        for arm, seed in plan:
            print(f"  {arm.label} seed {seed}: {_progress(run_dir(out, arm, seed), args.epochs)}", flush=True)
    failures, stopped = ([], None) if args.report_only else train_all(args, plan, out)
    if args.modules and stopped is None:
        failures += measure_modules(out, args)
    # What is still unfinished after training, without a failure or a stop, another process is training.
    left = [] if args.report_only else [(a, s) for a, s in plan if _state(run_dir(out, a, s)) != "finished"]
    if not collect_runs(out) and not any(m["runs"] for m in merged):
        if args.report_only:
            raise ValueError(f"--report-only: {out} holds no run with metrics yet; run the same command without "
                             "--report-only first")
        if stopped is None and not failures and left:
            return _left_to_others(left)
        if stopped is not None:
            return _stopped(stopped)
        print(f"mlaan bench accuracy: no run has produced metrics; see the logs in {out / 'logs'}", file=sys.stderr)
        return 1
    result = write_report(out, report_title(args), machine, recipe, merged)
    print("\n" + result["table"], flush=True)
    print(f"\nwrote {', '.join(result['files'])}", flush=True)
    if stopped is not None:
        return _stopped(stopped)
    if failures:
        return 1
    return _left_to_others(left) if left else 0


def report_title(args: argparse.Namespace) -> str:
    """``synthetic, resnet20 K=2, 1 epoch, batch 128, lr 0.1``: the recipe, as the report and its plot head it."""
    size = f" at {args.image_size} px" if getattr(args, "image_size", None) else ""
    return (f"{args.dataset}, {args.arch}{size} K={args.k}, {common.plural(args.epochs, 'epoch')}, "
            f"batch {args.batch_size}, lr {args.lr}")


# sysexits' EX_TEMPFAIL: nothing failed, but the comparison is not complete yet; try again later.
NOT_DONE_YET = 75


def _left_to_others(left: list[tuple[Arm, int]]) -> int:
    """The exit code when runs this command asked for are still being trained by another process."""
    names = ", ".join(f"{arm.label} seed {seed}" for arm, seed in left)
    print(f"mlaan bench accuracy: not finished yet, being trained by another process: {names}; run the same "
          "command again when they are done to report them too", file=sys.stderr)
    return NOT_DONE_YET


def _stopped(signum: int) -> int:
    print(f"mlaan bench accuracy: stopped by {StopSignals.name(signum)}; run the same command again to continue",
          file=sys.stderr)
    return 128 + signum
