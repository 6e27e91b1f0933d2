"""Property tests (hypothesis): no command line, config file or checkpoint makes ``mlaan`` print a traceback.

Every input either passes validation (exit 0; ``Trainer.fit`` is replaced by a no-op here, so nothing trains) or
is answered with ``mlaan…: error: …`` on stderr and exit code 2. Validation never writes: the output folder is
not created. Values of options that allocate memory (synthetic data sizes, aux widths) are kept small, and
``--download`` is left out (no network here).
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlaan import models
from mlaan.cli import main
from mlaan.data import available_datasets
from mlaan.engine import available_methods
from mlaan.training import make_trainer
from mlaan.training.config import FIELD_NAMES
from mlaan.training.trainer import Trainer

# A fixed sequence of examples by default (reproducible runs); MLAAN_FUZZ_EXAMPLES=N MLAAN_FUZZ_RANDOM=1 explores.
FUZZ = settings(max_examples=int(os.environ.get("MLAAN_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=list(HealthCheck), derandomize=not os.environ.get("MLAAN_FUZZ_RANDOM"),
                database=None)
COUNTS: dict[str, dict[str, int]] = {}  # examples per test and exit code, written to MLAAN_FUZZ_LOG if set

BASE = ["--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "16",
        "--arch", "resnet20", "--workers", "0", "--no-download"]
SAFE_CHARS = st.characters(codec="utf-8", exclude_characters="/\\.\x00", exclude_categories=("Cs",))
SAFE_NAME = st.text(SAFE_CHARS, min_size=1, max_size=12)


MESSAGES: set[str] = set()  # error lines of the plausible-options test, for the report


def _count(name: str, code: object) -> None:
    per_code = COUNTS.setdefault(name, {})
    per_code[f"exit {code}"] = per_code.get(f"exit {code}", 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    path = os.environ.get("MLAAN_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(COUNTS) + "\n")
            f.write(json.dumps(sorted(MESSAGES)) + "\n")


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    monkeypatch.setattr(Trainer, "fit", lambda self: {})


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse: usage errors (2), --help / --version (0)
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def check_answer(code, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2 and not err.startswith("usage: mlaan"):  # plain `mlaan`: the help, on stderr
        last = err.rsplit("\r", 1)[-1].strip().splitlines()
        assert last and all(line.startswith("mlaan") for line in last), err
        assert "error:" in last[-1], err


# ----------------------------------------------------------------------------------------- option values
def numbers() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-(10**20), 10**20).map(str),
        st.integers(-3, 40).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "1_000", " 3", "", "½", "0.0", "-0"]),
    )


def small_ints() -> st.SearchStrategy[str]:
    """For options that allocate: valid or invalid, but never huge."""
    return st.one_of(st.integers(-5, 64).map(str), st.sampled_from(["", "x", "1.5", "nan", "-1e3"]))


TEXT = st.text(max_size=20)
CHOICES = {
    "--dataset": st.one_of(st.sampled_from(available_datasets()), TEXT),
    "--arch": st.one_of(st.sampled_from(models.available()), TEXT),
    "--method": st.one_of(st.sampled_from(available_methods()), TEXT,
                          st.sampled_from(["DGL+MLAAN", "dgl+", "+mlaan", "bp+mlaan", "dgl+mlaan+lam"])),
    "--ema-update": st.one_of(st.sampled_from(["all", "last"]), TEXT),
    "--aux-head": st.one_of(st.sampled_from(["mlp", "linear"]), TEXT),
    "--infopro-task": st.one_of(st.sampled_from(["ce", "contrastive"]), TEXT),
    "--balance": st.one_of(st.sampled_from(["blocks", "memory"]), TEXT),
    "--device": st.one_of(st.sampled_from(["auto", "cpu", "cuda", "cuda:3", "mps", "tpu", "cpu:0"]), TEXT),
}
NUMERIC = ["--local-modules", "-K", "--window", "--w-ind", "--w-casc", "--ema-momentum", "--depth-shrink",
           "--temperature", "--epochs", "--batch-size", "--eval-batch-size", "--lr", "--momentum",
           "--weight-decay", "--warmup-epochs", "--max-steps", "--save-every", "--seed", "--workers",
           "--train-samples", "--test-samples"]
ALLOCATING = ["--synthetic-train-size", "--synthetic-test-size", "--synthetic-image-size", "--aux-width",
              "--lam-depth", "--auglocal-depth"]
PAIRS = ["--infopro-lambda-recon", "--infopro-lambda-task"]
SWITCHES = ["--nesterov", "--no-nesterov", "--amp", "--no-amp", "--sync-bn", "--no-sync-bn", "--tensorboard",
            "--no-tensorboard", "--overwrite", "--no-overwrite"]


@st.composite
def train_argv(draw, out: Path) -> list[str]:
    argv = ["train", *BASE, "--output-dir", str(out / "run")]
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["choice", "numeric", "allocating", "pair", "switch", "path", "junk"]))
        if kind == "choice":
            flag = draw(st.sampled_from(sorted(CHOICES)))
            argv += [flag, draw(CHOICES[flag])]
        elif kind == "numeric":
            argv += [draw(st.sampled_from(NUMERIC)), draw(numbers())]
        elif kind == "allocating":
            argv += [draw(st.sampled_from(ALLOCATING)), draw(small_ints())]
        elif kind == "pair":
            argv += [draw(st.sampled_from(PAIRS)), draw(numbers()), draw(numbers())]
        elif kind == "switch":
            argv.append(draw(st.sampled_from(SWITCHES)))
        elif kind == "path":
            flag = draw(st.sampled_from(["--data-root", "--output-dir", "--config", "--resume"]))
            argv += [flag, str(out / draw(SAFE_NAME))]
        else:  # a stray token, a flag without its value, a prefix of a flag
            argv.append(draw(st.one_of(TEXT, st.sampled_from(["--resume", "--lr", "-K", "--out", "--ep", "--",
                                                              "-", "train", "--config"]))))
    return argv


@FUZZ
@given(data=st.data())
def test_fuzz_train_command_line(tmp_path_factory, capsys, data):
    label = "train command lines"
    out = tmp_path_factory.mktemp("argv")
    argv = data.draw(train_argv(out), label="argv")
    code, _, err = run_cli(capsys, argv)
    check_answer(code, err)
    _count(label, code)
    assert not (out / "run").exists() and not [p for p in out.rglob("*") if p.is_file()]  # nothing written


@st.composite
def plausible_argv(draw, out: Path) -> list[str]:
    """Mostly valid options in every combination (method x K x window x heads x ...), so that the accepting
    path (building data, model, optimizer) is exercised too; one value now and then is out of range."""
    def num(lo, hi, kind=int):
        value = draw(st.integers(lo, hi) if kind is int else st.floats(lo, hi, allow_nan=False))
        return str(value)

    argv = ["train", *BASE, "--output-dir", str(out / "run"), "--arch", draw(st.sampled_from(["resnet20", "resnet32"])),
            "--method", draw(st.sampled_from(available_methods()))]
    optional = {
        "-K": lambda: num(0, 17), "--window": lambda: num(1, 5), "--w-ind": lambda: num(0, 1, float),
        "--w-casc": lambda: num(0, 1, float), "--ema-momentum": lambda: num(0, 1, float),
        "--ema-update": lambda: draw(st.sampled_from(["all", "last"])), "--lam-depth": lambda: num(0, 6),
        "--depth-shrink": lambda: num(-0.5, 1.5, float), "--aux-head": lambda: draw(st.sampled_from(["mlp", "linear"])),
        "--aux-width": lambda: num(1, 64), "--infopro-task": lambda: draw(st.sampled_from(["ce", "contrastive"])),
        "--temperature": lambda: num(0, 2, float), "--auglocal-depth": lambda: num(0, 4),
        "--balance": lambda: draw(st.sampled_from(["blocks", "memory"])), "--epochs": lambda: num(0, 400),
        "--batch-size": lambda: num(0, 64), "--lr": lambda: num(0, 2, float), "--momentum": lambda: num(0, 1, float),
        "--weight-decay": lambda: num(0, 0.1, float), "--warmup-epochs": lambda: num(0, 20, float),
        "--seed": lambda: num(0, 2**33), "--save-every": lambda: num(0, 10), "--max-steps": lambda: num(0, 10),
        "--synthetic-image-size": lambda: num(6, 40), "--train-samples": lambda: num(0, 40),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(optional)), max_size=8, unique=True)):
        argv += [flag, optional[flag]()]
    argv += draw(st.lists(st.sampled_from(["--infopro-lambda-recon 5 0", "--infopro-lambda-task 0.5 0", "--amp",
                                           "--no-nesterov", "--sync-bn", "--overwrite"]), max_size=2, unique=True)
                 .map(lambda xs: [t for x in xs for t in x.split()]))
    return argv


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))  # each accepted one builds a model
@given(data=st.data())
def test_fuzz_plausible_train_options(tmp_path_factory, capsys, data):
    out = tmp_path_factory.mktemp("plausible")
    argv = data.draw(plausible_argv(out), label="argv")
    code, _, err = run_cli(capsys, argv)
    label = "plausible train options"
    check_answer(code, err)
    _count(label, code)
    if code == 2 and os.environ.get("MLAAN_FUZZ_LOG"):
        MESSAGES.add(err.strip().splitlines()[-1][:160])
    assert not (out / "run").exists()


@FUZZ
@given(argv=st.lists(st.one_of(TEXT, st.sampled_from(["train", "eval", "export", "download", "--checkpoint",
                                                      "--out", "--json", "--help", "--version", "-h"])),
                     max_size=6))
def test_fuzz_any_tokens(tmp_path_factory, capsys, monkeypatch, argv):
    """Arbitrary tokens after ``mlaan`` (eval/export/download included; download has no network here)."""
    label = "arbitrary token lists"
    monkeypatch.chdir(tmp_path_factory.mktemp("tokens"))
    monkeypatch.setattr("mlaan.data.download_dataset", _no_download)
    code, _, err = run_cli(capsys, argv)
    check_answer(code, err)
    _count(label, code)


def _no_download(name, root):
    raise ValueError(f"no network in tests (asked for {name!r} into {root})")


# ------------------------------------------------------------------------------------------- config files
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["yes", "off", "1e-3", "~", "0x1F", "NaN", ".inf", "[]", "{}"]),
)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3)), max_leaves=6)
FILE_KEYS = [k for k in FIELD_NAMES if k not in ("output_dir", "download") and not k.startswith("synthetic_")
             and k not in ("aux_width", "lam_depth", "auglocal_depth")]


@FUZZ
@given(values=st.dictionaries(st.one_of(st.sampled_from(FILE_KEYS), st.text(max_size=10)), YAML_VALUES,
                              max_size=6))
def test_fuzz_config_file_values(tmp_path_factory, capsys, values):
    """A YAML mapping of known and unknown keys with values of any YAML type."""
    label = "config files (structured)"
    out = tmp_path_factory.mktemp("cfg")
    path = out / "c.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    code, _, err = run_cli(capsys, ["train", "--config", str(path), "--output-dir", str(out / "run"),
                                    "--synthetic-train-size", "32", "--synthetic-test-size", "16", "--no-download"])
    check_answer(code, err)
    _count(label, code)
    assert not (out / "run").exists()


@FUZZ
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["lr: ", "epochs:", " 3", "\n", "- ", "[", "]", "{", "}", ": ", "&a ", "*a", "!!",
                              "!!python/object:os.system", "'", '"', "#", "\t", "? ", "---\n", "...\n", "|",
                              "dataset: synthetic\n", "extra: ", "%YAML 1.1\n"]), max_size=30).map("".join),
    st.integers(1, 3000).map(lambda n: "[" * n),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
))
def test_fuzz_config_file_text(tmp_path_factory, capsys, text):
    """Arbitrary text as a config file: broken YAML, tags, aliases, deep nesting."""
    label = "config files (raw text)"
    out = tmp_path_factory.mktemp("cfgtext")
    path = out / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if not text.isascii() else text.encode())
    code, _, err = run_cli(capsys, ["train", "--config", str(path), "--dataset", "synthetic", "--output-dir",
                                    str(out / "run"), "--synthetic-train-size", "32", "--synthetic-test-size", "16",
                                    "--no-download"])
    check_answer(code, err)
    _count(label, code)
    assert not (out / "run").exists()


# -------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = make_trainer(None, {"dataset": "synthetic", "synthetic_train_size": 32, "synthetic_test_size": 16,
                                  "arch": "resnet20", "local_modules": 3, "batch_size": 16, "max_steps": 1,
                                  "output_dir": str(out)}, log=lambda m: None)
    state = trainer.checkpoint_state(0.0)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)), command=st.sampled_from(["eval", "train", "export"]))
def test_fuzz_damaged_checkpoint_bytes(tmp_path_factory, capsys, monkeypatch, checkpoint_bytes, edits, cut, command):
    """Random bytes overwritten, or the file cut at a random length."""
    label = "damaged checkpoints (bytes)"
    monkeypatch.undo()  # a checkpoint that is accepted really trains a step (fit's own checks)
    blob = bytearray(checkpoint_bytes[0])
    for where, value in edits:
        blob[int(where * len(blob))] = value
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    folder = tmp_path_factory.mktemp("damaged")
    path = folder / "last.pt"
    path.write_bytes(bytes(blob))
    code, _, err = run_cli(capsys, _checkpoint_argv(command, path, folder))
    check_answer(code, err)
    _count(label, code)


PLAIN = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=8),
              st.builds(torch.zeros, st.integers(0, 3))),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5,
)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["format", "version", "arch", "method", "local_modules", "dataset",
                                                "num_classes", "in_channels", "image_size", "mean", "std", "model",
                                                "optimizer", "scheduler", "epoch", "epoch_step", "step",
                                                "best_accuracy", "best_epoch", "config", "rng", "epoch_partial",
                                                "wall_time"]),
                               st.one_of(st.just("<delete>"), PLAIN), min_size=1, max_size=3),
       command=st.sampled_from(["eval", "train", "export"]))
def test_fuzz_checkpoint_contents(tmp_path_factory, capsys, monkeypatch, checkpoint_bytes, changes, command):
    """Well-formed files (tensors and plain data only, valid checksums) whose fields are missing or of the
    wrong type or value."""
    label = "checkpoints with wrong fields"
    monkeypatch.undo()  # a checkpoint that is accepted really trains a step (fit's own checks)
    state = dict(checkpoint_bytes[1])
    for key, value in changes.items():
        if value == "<delete>":
            state.pop(key, None)
        else:
            state[key] = value
    folder = tmp_path_factory.mktemp("fields")
    path = folder / "last.pt"
    torch.save(state, path)
    code, _, err = run_cli(capsys, _checkpoint_argv(command, path, folder))
    check_answer(code, err)
    _count(label, code)


NESTED_KEYS = {
    "config": list(FIELD_NAMES),
    "scheduler": ["base_lrs", "last_epoch", "_step_count", "_last_lr", "lr_lambdas", "_is_initial"],
    "optimizer": ["state", "param_groups"],
    "param_group": ["lr", "momentum", "nesterov", "weight_decay", "params", "initial_lr", "dampening"],
    "epoch_partial": ["loss_sum", "correct", "count", "seconds"],
    "rng": ["torch", "python", "python_gauss", "numpy_keys", "numpy_pos", "numpy_gauss"],
}


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(sorted(NESTED_KEYS)), st.data()), min_size=1, max_size=3),
       command=st.sampled_from(["eval", "train", "export"]))
def test_fuzz_checkpoint_nested_fields(tmp_path_factory, capsys, monkeypatch, checkpoint_bytes, changes, command):
    """Valid top-level fields whose insides (config options, scheduler/optimizer state, RNG states) are
    missing, of the wrong type or out of range."""
    label = "checkpoints with wrong nested fields"
    monkeypatch.undo()  # a checkpoint that is accepted really trains a step (fit's own checks)
    state = copy.deepcopy(checkpoint_bytes[1])
    for where, data in changes:
        key = data.draw(st.one_of(st.sampled_from(NESTED_KEYS[where]), st.text(max_size=6)), label=f"{where} key")
        value = data.draw(st.one_of(st.just("<delete>"), PLAIN, YAML_SCALARS), label=f"{where}[{key!r}]")
        target = state.get(where)
        if where == "param_group":
            groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
            target = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else None
        if not isinstance(target, dict):  # replaced by an earlier change
            continue
        if value == "<delete>":
            target.pop(key, None)
        else:
            target[key] = value
    folder = tmp_path_factory.mktemp("nested")
    path = folder / "last.pt"
    torch.save(state, path)
    code, _, err = run_cli(capsys, _checkpoint_argv(command, path, folder))
    check_answer(code, err)
    _count(label, code)


def _checkpoint_argv(command: str, path: Path, folder: Path) -> list[str]:
    if command == "eval":
        return ["eval", "--checkpoint", str(path), "--test-samples", "8", "--json"]
    if command == "export":
        return ["export", "--checkpoint", str(path), "--out", str(folder / "model.pt")]
    return ["train", "--resume", str(path), "--no-download", "--max-steps", "1"]  # one real step if accepted


# ------------------------------------------------------------------------------------------ real processes
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(data=st.data())
def test_fuzz_in_a_real_process(tmp_path_factory, data):
    """A few command lines through ``python -m mlaan`` itself (the real stderr, the real exit code)."""
    label = "real processes"
    out = tmp_path_factory.mktemp("proc")
    argv = data.draw(train_argv(out), label="argv")
    argv = [a for a in argv if "\x00" not in a]  # cannot be passed to exec
    # --max-steps 0 is refused, so a valid command line stops at validation... unless it is valid: then it
    # would train; keep it tiny
    argv += ["--synthetic-train-size", "16", "--synthetic-test-size", "8", "--max-steps", "1", "--epochs", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mlaan", *argv], capture_output=True, env=env, timeout=600)
    check_answer(proc.returncode, proc.stderr.decode(errors="replace"))
    _count(label, proc.returncode)
