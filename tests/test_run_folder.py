"""A run folder has one owner (issue 15.1) and a resumed epoch's train metrics cover the whole epoch (15.4)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlaan.cli import main
from mlaan.training import make_trainer
from mlaan.training.safety import RunFolderLock

TINY = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--arch",
        "resnet20", "-K", "4", "--batch-size", "16", "--device", "cpu"]
HOLD = (
    "import sys, time; from mlaan.training.safety import RunFolderLock; "
    "lock = RunFolderLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)"
)


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def holder(tmp_path):
    """Another process that owns ``tmp_path/run`` until it is killed."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_second_run_into_a_held_folder_is_refused_in_one_line(holder, capsys):
    folder, proc = holder
    code, out, err = run_cli(capsys, "train", *TINY, "--method", "dgl+mlaan", "--max-steps", "2",
                             "--output-dir", folder)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlaan: error: output dir")
    assert "in use" in lines[0] and f"process {proc.pid} on {socket.gethostname()}" in lines[0]
    assert not any((folder / name).exists() for name in ("metrics.jsonl", "metrics.json", "last.pt", "best.pt"))


def test_a_resume_into_a_held_folder_is_refused_too(tmp_path, capsys):
    folder = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--max-steps", "1", "--output-dir", folder)[0] == 0
    lock = RunFolderLock(folder)
    lock.acquire()
    try:
        code, _, err = run_cli(capsys, "train", "--output-dir", folder, "--resume", "--max-steps", "2")
    finally:
        lock.release()
    assert code == 2 and "in use" in err and len(err.strip().splitlines()) == 1
    assert json.loads((folder / "metrics.json").read_text())["steps"] == 1  # untouched


def test_lock_of_a_killed_run_is_recovered(holder, capsys):
    folder, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (folder / RunFolderLock.LOCK_NAME).exists()  # the killed owner's files stay behind
    code, _, err = run_cli(capsys, "train", *TINY, "--max-steps", "1", "--output-dir", folder)
    assert code == 0, err
    assert (folder / "metrics.json").is_file()


def test_fit_takes_the_folder_before_writing_and_checks_again_under_the_lock(tmp_path):
    """Building a Trainer writes nothing; fit() takes the lock first (refused while another run holds it,
    leaving the folder as it was) and checks again that no run was written there since the build."""
    folder = tmp_path / "run"
    overrides = {"dataset": "synthetic", "synthetic_train_size": 64, "synthetic_test_size": 32, "arch": "resnet20",
                 "local_modules": 4, "batch_size": 16, "max_steps": 1, "device": "cpu", "output_dir": str(folder)}
    trainer = make_trainer(None, overrides, log=lambda m: None)
    assert not folder.exists()
    other = RunFolderLock(folder)
    other.acquire()
    with pytest.raises(ValueError, match="in use by another run"):
        trainer.fit()
    assert sorted(p.name for p in folder.iterdir()) == sorted([RunFolderLock.LOCK_NAME, RunFolderLock.OWNER_NAME])
    other.release()
    late = make_trainer(None, overrides, log=lambda m: None)
    trainer.fit()  # the folder is free now
    trainer.close()
    with pytest.raises(ValueError, match="already holds a run"):
        late.fit()  # built before the other run wrote there
    late.close()


def test_refused_start_leaves_a_new_folder_uncreated(tmp_path, capsys):
    """A bad option found while taking the folder (here: a run already there) leaves no lock files behind, and
    a folder that did not exist is not created by a refused start."""
    folder = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--max-steps", "1", "--output-dir", folder)[0] == 0
    before = sorted(p.name for p in folder.iterdir())
    code, _, err = run_cli(capsys, "train", *TINY, "--max-steps", "1", "--output-dir", folder)
    assert code == 2 and "already holds a run" in err
    assert sorted(p.name for p in folder.iterdir()) == before
    missing = tmp_path / "a" / "b"
    code, _, err = run_cli(capsys, "train", *TINY, "--arch", "nope", "--output-dir", missing)
    assert code == 2 and not (tmp_path / "a").exists()


def _torchrun(tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "mlaan", "train", *TINY,
           "--max-steps", "1", "--output-dir", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_torchrun_ranks_are_refused_together_when_rank0_cannot_take_the_folder(holder, tmp_path):
    folder, proc = holder
    result = _torchrun(tmp_path, folder)
    assert result.returncode != 0
    # each rank says why in one line, naming itself (the two may interleave on the shared stderr; torchrun then
    # reports the failed workers in its own words)
    assert f"mlaan: error: rank 0: output dir {folder} is in use by another run (process {proc.pid}" in result.stderr
    assert "rank 0 could not take it" in result.stderr or result.stderr.count("mlaan: error:") == 1
    assert not (folder / "metrics.jsonl").exists()
