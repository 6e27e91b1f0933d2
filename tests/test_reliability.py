"""Trustworthy runs (issue 5): exact resume after SIGKILL at random steps, SIGINT/SIGTERM stop-save-resume,
non-finite losses, a full disk during a save, one-line errors (exit 2) for every bad input that leave what was
written alone, and checkpoints that can never run code.

``MLAAN_RELIABILITY_LOG=FILE`` appends what the kill tests did (kill points, where each run resumed, kills that
landed inside a save) as JSON lines, for BENCHMARKS.md.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlaan import atomic, data
from mlaan.cli import main
from mlaan.training import checkpoint as ckpt_io
from mlaan.training import safety

PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32",
        "--arch", "resnet20", "-K", "3", "--batch-size", "32", "--workers", "0"]

# Runs `mlaan` with one line "STEP" on stdout after each optimizer step (after the EMA update), so that a test
# can kill it after a chosen number of steps. Nothing else differs from `python -m mlaan`.
TRACED = """
import sys
from mlaan.engine.local_model import LocalModel
_after = LocalModel.after_optimizer_step
def _traced(self, *args, **kwargs):
    out = _after(self, *args, **kwargs)
    print("STEP", flush=True)
    return out
LocalModel.after_optimizer_step = _traced
from mlaan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code, err, words=(), exit_code=2):
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = err.rsplit("\r", 1)[-1].strip().splitlines()  # after the progress bar, if training had begun
    assert len(lines) == 1 and lines[0].startswith("mlaan"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _log(record: dict) -> None:
    path = os.environ.get("MLAAN_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------- comparisons
def same(a, b, where="") -> None:
    """Bit-identical tensors, equal everything else, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        bits = (a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
                b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
        assert torch.equal(*bits), where  # bit for bit (a NaN equals the same NaN)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


TIMING = ("images_per_second", "epoch_seconds", "peak_memory_bytes", "wall_time_seconds", "total_wall_time_seconds")


def assert_same_run(ref: Path, run: Path) -> None:
    """Final checkpoints (backbone, aux nets, EMA twins, optimizer, scheduler, RNGs, counters) and metrics of
    two runs are identical; only timings and paths may differ."""
    for name in ("last.pt", "best.pt"):
        a = ckpt_io.load_training_checkpoint(ref / name)
        b = ckpt_io.load_training_checkpoint(run / name)
        assert any(".twin." in k for k in a["model"]) and any(k.startswith("independent_heads.") for k in a["model"])
        for key in ("model", "optimizer", "scheduler", "rng", "epoch", "epoch_step", "step", "best_accuracy",
                    "best_epoch"):
            same(a[key], b[key], f"{name}:{key}")
        same({k: v for k, v in a["epoch_partial"].items() if k != "seconds"},
             {k: v for k, v in b["epoch_partial"].items() if k != "seconds"})
        per_invocation = ("output_dir", "overwrite", "max_steps")
        same({k: v for k, v in a["config"].items() if k not in per_invocation},
             {k: v for k, v in b["config"].items() if k not in per_invocation})
    lines = [[{k: v for k, v in json.loads(x).items() if k not in TIMING}
              for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, run)]
    assert lines[0] == lines[1]
    keep = ("test_accuracy", "test_error", "test_loss", "best_accuracy", "best_epoch", "steps", "epochs_completed",
            "steps_per_epoch", "split", "parameters")
    sums = [{k: json.loads((d / "metrics.json").read_text())[k] for k in keep} for d in (ref, run)]
    assert sums[0] == sums[1]


# ------------------------------------------------------------------------------------------ kill tests
class Traced:
    """`mlaan train` in a subprocess that prints STEP after each optimizer step."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self.stderr_file = open(stderr_path, "w")
        self.proc = subprocess.Popen([PY, "-c", TRACED, *args], stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     text=True, env=ENV)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.steps = 0
        self.stdout: list[str] = []

    def read_steps(self, n: int, timeout: float = 300.0) -> bool:
        """Read stdout until ``n`` more STEP lines; False if the process ended first."""
        target, deadline = self.steps + n, time.monotonic() + timeout
        while self.steps < target:
            if not self.selector.select(timeout=max(0.0, deadline - time.monotonic())):
                self.proc.kill()
                raise AssertionError(f"no step for {timeout}s: {self.stdout[-5:]}")
            line = self.proc.stdout.readline()
            if not line:
                return False
            self.stdout.append(line)
            self.steps += line.strip() == "STEP"
        return True

    def finish(self, timeout: float = 600.0) -> tuple[int, str]:
        rest, _ = self.proc.communicate(timeout=timeout)
        self.stdout += rest.splitlines(keepends=True)
        self.steps += sum(line.strip() == "STEP" for line in rest.splitlines())
        self.stderr_file.close()
        return self.proc.returncode, Path(self.stderr_file.name).read_text()


def saved_step(folder: Path) -> int | None:
    """The step of ``last.pt`` (None if there is none). Loading it also proves it is whole: a kill never
    leaves half a checkpoint."""
    path = folder / "last.pt"
    return int(ckpt_io.load_training_checkpoint(path)["step"]) if path.exists() else None


def run_reference(args: list[str], out: Path, tmp_path: Path) -> None:
    ref = Traced([*args, "--output-dir", str(out)], tmp_path / "ref.err")
    code, err = ref.finish()
    assert code == 0, err


def kill_and_resume(args: list[str], out: Path, tmp_path: Path, plan: list[int], seed: int,
                    max_steps_before_kill: int = 3) -> list[dict]:
    """Interrupt a run with each signal of ``plan`` in turn (after a random number of steps and a random
    delay), resume it after each one with the same arguments + ``--resume``, then let it finish."""
    rng = random.Random(seed)
    events = []
    for i, signum in enumerate([*plan, None]):
        start = saved_step(out)
        resume = ["--resume"] if start is not None else (["--overwrite"] if out.exists() else [])
        proc = Traced([*args, "--output-dir", str(out), *resume], tmp_path / f"run{i}.err")
        if signum is None:
            code, err = proc.finish()
            assert code == 0, err
            break
        n = rng.randint(1, max_steps_before_kill)
        delay = rng.uniform(0.0, 0.3)
        assert proc.read_steps(n), f"the run ended before {n} steps: make it longer"
        time.sleep(delay)
        proc.proc.send_signal(signum)
        code, err = proc.finish()
        stale = [p.name for p in atomic.stale_temp_files(out, ("last.pt", "best.pt"))]
        after = saved_step(out)
        event = {"signal": signal.Signals(signum).name, "steps_read": n, "delay_s": round(delay, 3),
                 "resumed_from_step": start, "steps_run": proc.steps, "checkpoint_step_after": after,
                 "killed_during_save": bool(stale), "exit_code": code}
        events.append(event)
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:  # finish the step in progress, save, say how to resume, exit 128 + signal
            assert code == 128 + signum, err
            last = err.strip().splitlines()[-1]
            assert "Traceback" not in err and last.startswith("mlaan: stopped by " + signal.Signals(signum).name)
            assert f"resume with: mlaan train --output-dir {out} --resume" in last
            assert after == (start or 0) + proc.steps, (event, proc.stdout[-3:])
            assert not stale
    return events


KILL_ARGS = ["train", "--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-test-size", "64",
             "--arch", "resnet20", "-K", "3", "--method", "dgl+mlaan", "--batch-size", "32", "--epochs", "6",
             "--lr", "0.05", "--warmup-epochs", "1", "--workers", "0", "--seed", "7"]


def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path):
    """5 SIGKILLs (plus a SIGTERM and a SIGINT) at random steps of one run, each followed by --resume: the
    final backbone, aux nets, EMA twins, optimizer, scheduler, RNGs and metrics equal an uninterrupted run's.
    Checkpoints every 2 steps (and at each epoch's end), so runs resume mid-epoch and at epoch ends, and
    some kills land inside a save."""
    args = [*KILL_ARGS, "--save-every", "2"]
    run_reference(args, tmp_path / "ref", tmp_path)
    K, T, I = signal.SIGKILL, signal.SIGTERM, signal.SIGINT
    events = kill_and_resume(args, tmp_path / "killed", tmp_path, [K, K, T, K, I, K, K], seed=5)
    assert sum(e["signal"] == "SIGKILL" for e in events) >= 5
    assert_same_run(tmp_path / "ref", tmp_path / "killed")
    assert not atomic.stale_temp_files(tmp_path / "killed", ("last.pt", "best.pt"))  # cleaned on resume
    _log({"test": "save-every-2", "kills": events})


def test_ctrl_c_to_the_process_group_with_loader_workers(tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too: they ignore it, the main process finishes the
    step, saves and says how to resume."""
    out = tmp_path / "run"
    proc = subprocess.Popen([PY, "-c", TRACED, "train", *TINY[:-2], "--synthetic-train-size", "256",
                             "--workers", "2", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    steps = 0
    for line in proc.stdout:
        steps += line.strip() == b"STEP"
        if steps == 2:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=600)
    steps += rest.count(b"STEP")
    last = err.decode().replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
    assert last.startswith("mlaan: stopped by SIGINT") and f"--output-dir {out} --resume" in last
    assert saved_step(out) == steps


@pytest.mark.slow
@pytest.mark.parametrize(("method", "save_every", "seed"), [("infopro+mlaan", None, 11), ("dgl+mlaan", 1, 12)])
def test_more_kill_points(tmp_path, method, save_every, seed):
    """Eight more SIGKILLs per configuration: checkpoints only at epoch ends (so a kill loses the epoch in
    progress and the run replays it), and a save after every step (kills land inside saves often)."""
    args = [*KILL_ARGS, "--method", method, *(["--save-every", str(save_every)] if save_every else [])]
    run_reference(args, tmp_path / "ref", tmp_path)
    events = kill_and_resume(args, tmp_path / "killed", tmp_path, [signal.SIGKILL] * 8, seed=seed,
                             max_steps_before_kill=4 if save_every is None else 3)
    assert_same_run(tmp_path / "ref", tmp_path / "killed")
    _log({"test": f"{method}-save-every-{save_every}", "kills": events})


# -------------------------------------------------------------------------------------- shared tiny run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run (2 steps, one epoch): last.pt, best.pt, metrics.jsonl, metrics.json."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["train", *TINY, "--max-steps", "2", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, run_dir) -> dict[str, Path]:
    """Broken data folders, checkpoints and config files."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)

    def fashion(name: str) -> Path:
        folder = root / name
        folder.mkdir()
        for split, n in (("train", 64), ("t10k", 32)):
            data.write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), np.uint8))
            data.write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, np.uint8))
        return folder

    cut = fashion("fm-cut")
    gz = cut / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])  # a download cut short
    wrong = fashion("fm-magic")
    (wrong / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04" + bytes(40)))
    short = fashion("fm-short")
    data.write_idx(short / "t10k-images-idx3-ubyte.gz", np.zeros((31, 28, 28), np.uint8))  # 31 images, 32 labels
    (root / "imagenet" / "train" / "cls").mkdir(parents=True)  # no val/

    good = (run_dir / "last.pt").read_bytes()
    files = {name: root / name for name in ("fm-cut", "fm-magic", "fm-short", "imagenet")}
    ckpts = {
        "truncated.pt": good[: len(good) // 2],
        "empty.pt": b"",
        "garbage.pt": bytes(rng.integers(0, 256, 4096, np.uint8)),
        "bitflip.pt": good[: len(good) // 3] + bytes([good[len(good) // 3] ^ 1]) + good[len(good) // 3 + 1:],
    }
    for name, blob in ckpts.items():
        (root / name).write_bytes(blob)
        files[name] = root / name
    torch.save(torch.zeros(3), root / "tensor.pt")
    files["tensor.pt"] = root / "tensor.pt"
    ckpt = ckpt_io.load_training_checkpoint(run_dir / "last.pt")
    for key, value in (("arch", "resnet32"), ("method", "dgl"), ("local_modules", 4)):
        torch.save({**ckpt, key: value}, root / f"other-{key}.pt")
        files[f"other-{key}.pt"] = root / f"other-{key}.pt"
    # loadable (tensors and plain data, valid checksums) but edited: found by tests/test_fuzz.py
    no_optimizer = {k: v for k, v in ckpt.items() if k != "optimizer"}
    scheduler = {k: v for k, v in ckpt["scheduler"].items() if k != "lr_lambdas"}
    param0 = next(iter(ckpt["optimizer"]["state"]))
    edited = {
        "no-optimizer.pt": no_optimizer,
        "model-int.pt": {**ckpt, "model": 5},
        "scheduler.pt": {**ckpt, "scheduler": scheduler},
        "lr-text.pt": {**ckpt, "optimizer": {**ckpt["optimizer"], "param_groups": [
            {**ckpt["optimizer"]["param_groups"][0], "lr": "abc"}]}},
        "momentum.pt": {**ckpt, "optimizer": {**ckpt["optimizer"], "state": {
            **ckpt["optimizer"]["state"], param0: {"momentum_buffer": torch.zeros(2)}}}},
        "rng.pt": {**ckpt, "rng": {**ckpt["rng"], "python": torch.zeros(3, dtype=torch.int64)}},
        "position.pt": {**ckpt, "epoch_step": 7},
    }
    for name, state in edited.items():
        torch.save(state, root / name)
        files[name] = root / name
    configs = {
        "python-tag.yaml": "lr: !!python/object/apply:os.system ['touch PWNED']\n",
        "list.yaml": "- lr\n- 0.1\n",
        "unknown-key.yaml": "lrr: 0.1\n",
        "bad-type.yaml": "batch_size: [1, 2]\n",
        "bad-yaml.yaml": "lr: [0.1\n",
        "bad-value.yaml": "momentum: 1.5\n",
    }
    for name, text in configs.items():
        (root / name).write_text(text)
        files[name] = root / name
    (root / "binary.yaml").write_bytes(b"\x00\xff\xfe\x00")
    files["binary.yaml"] = root / "binary.yaml"
    (root / "a-file").write_text("not a folder\n")
    files["a-file"] = root / "a-file"
    return files


# (id, extra flags for `mlaan train TINY --output-dir <run_dir>`, words the one error line must contain)
# "{name}" in a flag is replaced by bad_files[name]
BAD_INPUTS = [
    ("unknown dataset", ["--dataset", "mnist9"], ["'mnist9'", "available: fashion-mnist", "synthetic"]),
    ("unknown arch", ["--arch", "vgg11"], ["'vgg11'", "available: resnet20", "resnet110"]),
    ("unknown method", ["--method", "dgl+xyz"], ["'dgl+xyz'", "available: bp, dgl", "infopro+mlaan"]),
    # the spelling of config files and bench folders, and torchvision's class name: the close name is suggested
    ("method as a folder spells it", ["--method", "dgl_mlaan"], ["'dgl_mlaan' (did you mean 'dgl+mlaan'?)"]),
    ("dataset misspelt", ["--dataset", "fashion_mnist"], ["'fashion_mnist' (did you mean 'fashion-mnist'?)"]),
    ("K above range", ["-K", "11"], ["local_modules=11", "allowed 1 to 10"]),
    ("K zero", ["-K", "0"], ["local_modules=0", "allowed 1 to 10"]),
    ("K negative", ["-K", "-2"], ["local_modules=-2", "allowed 1 to 10"]),
    ("window above K", ["--window", "4"], ["window=4", "K=3", "allowed 2 to 3"]),
    ("batch size zero", ["--batch-size", "0"], ["batch_size", "got 0"]),
    ("batch size negative", ["--batch-size", "-8"], ["batch_size", "got -8"]),
    ("epochs zero", ["--epochs", "0"], ["epochs", "got 0"]),
    ("epochs negative", ["--epochs", "-3"], ["epochs", "got -3"]),
    ("lr zero", ["--lr", "0"], ["lr > 0", "lr=0.0"]),
    ("lr negative", ["--lr", "-0.1"], ["lr > 0", "lr=-0.1"]),
    ("lr nan", ["--lr", "nan"], ["lr must be a finite number, got nan"]),
    ("lr inf", ["--lr", "inf"], ["lr must be a finite number, got inf"]),
    ("momentum one", ["--momentum", "1"], ["0 <= momentum < 1", "momentum=1.0"]),
    ("momentum negative", ["--momentum", "-0.5"], ["0 <= momentum < 1", "momentum=-0.5"]),
    ("momentum above one", ["--momentum", "1.5"], ["0 <= momentum < 1", "momentum=1.5"]),
    ("ema momentum one", ["--ema-momentum", "1.0"], ["ema_momentum", "[0, 1)", "1.0"]),
    ("temperature zero", ["--temperature", "0"], ["temperature > 0", "got 0.0"]),
    ("aux width zero", ["--aux-width", "0"], ["aux_width >= 1", ", 0"]),
    ("seed overflow", ["--seed", str(2**70)], ["seed", str(2**70)]),
    ("bad int", ["--epochs", "many"], ["--epochs", "'many'"]),
    ("unknown flag", ["--no-such-flag"], ["--no-such-flag"]),
    ("missing data root", ["--dataset", "fashion-mnist", "--data-root", "/nonexistent/fm"],
     ["/nonexistent/fm", "does not exist"]),
    ("missing cifar root", ["--dataset", "cifar10", "--data-root", "/nonexistent/c10"], ["/nonexistent/c10"]),
    ("data root is a file", ["--dataset", "fashion-mnist", "--data-root", "{a-file}"], ["a-file", "not a folder"]),
    ("cut idx.gz", ["--dataset", "fashion-mnist", "--data-root", "{fm-cut}"],
     ["train-images-idx3-ubyte.gz", "truncated"]),
    ("corrupt idx", ["--dataset", "fashion-mnist", "--data-root", "{fm-magic}"],
     ["t10k-labels-idx1-ubyte.gz", "not an IDX file"]),
    ("idx sizes differ", ["--dataset", "fashion-mnist", "--data-root", "{fm-short}"], ["t10k-labels", "31"]),
    ("imagenet without val/", ["--dataset", "imagenet", "--data-root", "{imagenet}"], ["imagenet", "val/"]),
    ("missing checkpoint", ["--resume", "/nonexistent/last.pt"], ["/nonexistent/last.pt", "does not exist"]),
    ("truncated checkpoint", ["--resume", "{truncated.pt}"], ["truncated.pt", "not a readable checkpoint"]),
    ("empty checkpoint", ["--resume", "{empty.pt}"], ["empty.pt", "not a readable checkpoint"]),
    ("garbage checkpoint", ["--resume", "{garbage.pt}"], ["garbage.pt", "not a readable checkpoint"]),
    ("bit-flipped checkpoint", ["--resume", "{bitflip.pt}"], ["bitflip.pt", "is corrupt", "checksum"]),
    ("not an mlaan checkpoint", ["--resume", "{tensor.pt}"], ["tensor.pt", "not an mlaan training checkpoint"]),
    ("checkpoint of another arch", ["--resume", "{other-arch.pt}"], ["arch='resnet32'", "--arch 'resnet20'"]),
    ("checkpoint of another method", ["--resume", "{other-method.pt}"], ["method='dgl'", "'dgl+mlaan'"]),
    ("checkpoint of another K", ["--resume", "{other-local_modules.pt}"], ["local_modules=4", "--local-modules 3"]),
    ("checkpoint without optimizer", ["--resume", "{no-optimizer.pt}"], ["no 'optimizer' field"]),
    ("checkpoint model not a dict", ["--resume", "{model-int.pt}"], ["field 'model' should be a state_dict"]),
    ("checkpoint scheduler damaged", ["--resume", "{scheduler.pt}"], ["scheduler state does not fit", "lr_lambdas"]),
    ("checkpoint lr not a number", ["--resume", "{lr-text.pt}"], ["lr='abc', not a number"]),
    ("checkpoint momentum shape", ["--resume", "{momentum.pt}"], ["momentum buffer", "(2,)"]),
    ("checkpoint rng damaged", ["--resume", "{rng.pt}"], ["RNG states are damaged"]),
    ("checkpoint past epoch end", ["--resume", "{position.pt}"], ["step 7 of an epoch", "has 2 steps"]),
    ("resume with another K", ["--resume", "-K", "2"], ["local_modules=3", "--local-modules 2"]),
    ("resume with another lr", ["--resume", "--lr", "0.5"], ["--resume", "lr: 0.1 in the run, 0.5 given"]),
    ("resume with other epochs", ["--resume", "--epochs", "3", "--batch-size", "16"],
     ["epochs: 10 in the run, 3 given", "batch_size: 32 in the run, 16 given"]),
    ("resume with a config file", ["--resume", "--config", "{bad-value.yaml}"], ["momentum", "1.5"]),
    ("nothing to resume", ["--resume", "--output-dir", "{a-file}.d"], ["nothing to resume", "last.pt"]),
    ("output dir is a file", ["--output-dir", "{a-file}"], ["a-file", "not a folder"]),
    ("output dir under a file", ["--output-dir", "{a-file}/run"], ["a-file", "not a folder"]),
    ("config with a python tag", ["--config", "{python-tag.yaml}"], ["python-tag.yaml", "python/object/apply"]),
    ("config not a mapping", ["--config", "{list.yaml}"], ["list.yaml", "mapping"]),
    ("config unknown key", ["--config", "{unknown-key.yaml}"], ["'lrr'", "known keys: dataset"]),
    ("config bad type", ["--config", "{bad-type.yaml}"], ["'batch_size'", "[1, 2]", "not a valid int"]),
    ("config bad yaml", ["--config", "{bad-yaml.yaml}"], ["bad-yaml.yaml", "not valid YAML"]),
    ("config not text", ["--config", "{binary.yaml}"], ["binary.yaml", "not UTF-8"]),
    ("missing config", ["--config", "/nonexistent/c.yaml"], ["/nonexistent/c.yaml", "does not exist"]),
]


@pytest.mark.parametrize(("flags", "words"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_touched(run_dir, bad_files, capsys, flags, words):
    def fill(text: str) -> str:
        for name, path in bad_files.items():
            text = text.replace("{" + name + "}", str(path))
        return text

    flags, words = [fill(f) for f in flags], [fill(w) for w in words]
    folder = bad_files["a-file"].parent
    before, before_bad = snapshot(run_dir), snapshot(folder)
    code, out, err = cli(capsys, "train", *TINY, "--output-dir", run_dir, *flags)
    assert_one_line_error(code, err, words)
    _log({"bad_input": flags, "message": err.strip()})
    assert snapshot(run_dir) == before and snapshot(folder) == before_bad  # nothing written, moved or removed
    assert not Path("PWNED").exists()


@pytest.mark.parametrize("command", ["eval", "export"])
@pytest.mark.parametrize("name", ["truncated.pt", "empty.pt", "garbage.pt", "bitflip.pt", "tensor.pt"])
def test_eval_and_export_refuse_broken_checkpoints(bad_files, tmp_path, capsys, command, name):
    extra = ["--out", tmp_path / "m.pt"] if command == "export" else []
    code, _, err = cli(capsys, command, "--checkpoint", bad_files[name], *extra)
    assert_one_line_error(code, err, [name])
    assert list(tmp_path.iterdir()) == []


def test_output_dir_that_is_not_writable(run_dir, tmp_path, capsys):
    if os.geteuid() != 0:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o500)
        target = parent / "run"
    else:  # root writes through permission bits: use a file system that refuses new files
        target = Path("/sys/fs/mlaan-reliability-test/run")
        try:
            safety.check_output_dir(target)
            pytest.skip("no unwritable folder available to this user")
        except ValueError:
            pass
    try:
        code, _, err = cli(capsys, "train", *TINY, "--output-dir", target)
        assert_one_line_error(code, err, [str(target), "not writable"])
        assert not target.exists()
    finally:
        if os.geteuid() != 0:
            parent.chmod(0o700)


# -------------------------------------------------------------------------------- full disk, NaN, signals
def _full_disk(real_save):
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:4096])  # part of it went out, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_disk_full_during_a_save_keeps_the_last_checkpoint(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = snapshot(out)
    resume = ["train", *TINY, "--output-dir", out, "--resume", "--max-steps", "4"]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _full_disk(torch.save))
        code, _, err = cli(capsys, *resume)
    assert_one_line_error(code, err, [f"could not write {out / 'last.pt'}: No space left on device",
                                      f"{out / 'last.pt'} (step 2), is kept", f"--output-dir {out} --resume"])
    after = snapshot(out)
    for name in ("last.pt", "best.pt"):
        assert after[name] == before[name]
    assert after["metrics.jsonl"].startswith(before["metrics.jsonl"])  # the lines logged before are all there
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # the same command, with room on the disk, finishes; the line of the failed epoch is not doubled
    code, _, err = cli(capsys, *resume)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4] and ckpt_io.load_training_checkpoint(out / "last.pt")["step"] == 4


def test_file_size_limit_during_a_save_in_a_real_process(run_dir, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, like ENOSPC a failed write(2)): one line, exit 2,
    last.pt intact, no temporary file left."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = snapshot(out)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = subprocess.run([PY, "-m", "mlaan", "train", *TINY, "--output-dir", str(out), "--resume",
                           "--max-steps", "4"], capture_output=True, env=ENV, preexec_fn=limit_file_size)
    assert_one_line_error(proc.returncode, proc.stderr.decode(),  # bytes: keep the progress bar's \r
                          [f"could not write {out / 'last.pt'}: File too large", "(step 2), is kept"])
    assert snapshot(out)["last.pt"] == before["last.pt"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_loss_names_module_and_step_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code, _, err = cli(capsys, "train", *TINY, "--lr", "1e30", "--warmup-epochs", "0", "--save-every", "1",
                       "--output-dir", out)
    assert_one_line_error(code, err, ["non-finite local loss", "at local module",
                                                      "at step 2 (epoch 1)", "(step 1), is kept"], exit_code=1)
    ckpt = ckpt_io.load_training_checkpoint(out / "last.pt")  # the last good one, not overwritten
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_stop_signals_set_a_flag_count_a_quick_repeat_once_then_step_aside():
    calls = []
    before = {s: signal.getsignal(s) for s in safety.STOP_SIGNALS}
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # what a second SIGTERM would do
    try:
        with safety.StopSignals() as stop:
            assert stop.received is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs between bytecodes
            assert stop.received == signal.SIGTERM and calls == []
            os.kill(os.getpid(), signal.SIGTERM)  # the same request again (pkill + a harness passing it on)
            time.sleep(0.05)
            assert calls == [] and signal.getsignal(signal.SIGTERM) == stop._handle
            stop.REPEAT_WINDOW_S = 0.0  # a later one acts at once: the handler that was there before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert calls == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is not stop._handle
            assert signal.getsignal(signal.SIGINT) == stop._handle
    finally:
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])
    assert {s: signal.getsignal(s) for s in safety.STOP_SIGNALS} == before


# `mlaan train` whose second optimizer step ends with SIGTERM delivered twice, the second after the first one's
# handler has run: how pkill or a job scheduler (every process of a job) plus a harness passing the signal on
# reach a run.
ECHOED = """
import os, signal, sys, time
from mlaan.engine.local_model import LocalModel
_after, _steps = LocalModel.after_optimizer_step, []
def _echoed(self, *args, **kwargs):
    out = _after(self, *args, **kwargs)
    _steps.append(1)
    if len(_steps) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the first one's handler has run
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    return out
LocalModel.after_optimizer_step = _echoed
from mlaan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_signal_delivered_twice_still_saves(tmp_path):
    """The echo of a stop signal does not stop the run at once: it finishes the step, saves and exits 143."""
    out = tmp_path / "run"
    proc = subprocess.run([PY, "-c", ECHOED, "train", *TINY, "--output-dir", str(out)], capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mlaan: stopped by SIGTERM at step 2")
    assert saved_step(out) == 2


# ------------------------------------------------------------------------------------------------ security
class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickled_callable_is_refused(run_dir, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt = ckpt_io.load_training_checkpoint(run_dir / "last.pt")
    evil = tmp_path / "evil" / "last.pt"
    evil.parent.mkdir()
    torch.save({**ckpt, "extra": _Payload(marker)}, evil)
    plain = tmp_path / "fn.pt"
    torch.save({**ckpt, "hook": print}, plain)
    before = snapshot(tmp_path)
    for args in (["train", *TINY, "--resume", evil], ["train", *TINY, "--output-dir", evil.parent, "--resume"],
                 ["eval", "--checkpoint", evil], ["export", "--checkpoint", evil, "--out", tmp_path / "m.pt"]):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, ["is refused", "posix.system", "weights_only=True"])
    code, _, err = cli(capsys, "eval", "--checkpoint", plain)
    assert_one_line_error(code, err, ["is refused", "holds print"])
    assert not marker.exists() and snapshot(tmp_path) == before
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load would have run it
    assert marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(run_dir):
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (torch.Tensor, bool, int, float, str))

    for name in ("last.pt", "best.pt"):
        assert plain(torch.load(run_dir / name, weights_only=True))


def test_config_files_are_read_with_safe_load(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: !!python/object/apply:os.system ['touch PWNED']\n")
    code, _, err = cli(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "o")
    assert_one_line_error(code, err, ["not valid YAML"])
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie no one has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_is_signalled_when_its_parent_is_killed():
    """SIGKILL of a parent sends SIGTERM to the child it armed with ``signal_when_parent_dies`` — and only to
    that one: the unarmed child, started the same way, lives on (so the test can tell)."""
    code = ("import subprocess, sys, time\n"
            "from mlaan.training.safety import signal_when_parent_dies\n"
            "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
            "armed = subprocess.Popen(sleeper, preexec_fn=signal_when_parent_dies())\n"
            "plain = subprocess.Popen(sleeper)\n"
            "print(armed.pid, plain.pid, flush=True)\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    armed, plain = (int(pid) for pid in parent.stdout.readline().split())
    try:
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(armed) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(armed)
        assert _alive(plain)
    finally:
        for pid in (armed, plain):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
