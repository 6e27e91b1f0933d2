"""Runs that change shape on resume (issue 28): another world size or global batch (refused, or rescaled with
--rescale-schedule so that the lr schedule keeps its epochs and ends at zero), --boundary cut carried over as the
algorithm it is, data-parallel resume bit-identical (each rank's RNG states saved), the stop line said once.

Tiny synthetic runs on CPU: the 2-process ones under torchrun with gloo, one thread per process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pipeline import _torchrun

from mlaan.cli import main
from mlaan.training import resume as resume_io

# 128 images: 8 steps an epoch on 2 ranks x 8 images (global batch 16), 16 in one process, 4 on 4 ranks
RUN = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-test-size", "16",
       "--arch", "resnet20", "-K", "4", "--method", "dgl+mlaan", "--epochs", "2", "--batch-size", "8",
       "--threads", "1", "--seed", "2", "--warmup-epochs", "0.5"]
TRAIN = ["train", *RUN]


def _one_process(args: list[str], expect: int = 0) -> None:
    threads = torch.get_num_threads()
    try:
        assert main([*TRAIN, *args]) == expect
    finally:
        torch.set_num_threads(threads)


def _ckpt(folder: Path) -> dict:
    return torch.load(folder / "last.pt", weights_only=False)


def _lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _epoch_end_lrs(folder: Path) -> list[float]:
    return [line["lr"] for line in _lines(folder) if line["complete"]]


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = _ckpt(a), _ckpt(b)
    assert x["model"].keys() == y["model"].keys()
    assert not [k for k in x["model"] if not torch.equal(x["model"][k], y["model"][k])]
    for i, state in x["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], y["optimizer"]["state"][i]["momentum_buffer"]), i


@pytest.fixture(scope="module")
def data_runs(tmp_path_factory) -> dict[str, Path]:
    """On 2 ranks (--parallel data): an uninterrupted run, and one stopped by --max-steps 5 (in epoch 1)."""
    root = tmp_path_factory.mktemp("shape")
    runs = {"ref": root / "ref", "stopped": root / "stopped"}
    _torchrun([*RUN, "--output-dir", str(runs["ref"])])
    _torchrun([*RUN, "--output-dir", str(runs["stopped"]), "--max-steps", "5"])
    return runs


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


# ------------------------------------------------------------------------------ another world size, 1.
def test_two_ranks_resumed_in_one_process_is_refused_then_rescaled(data_runs, tmp_path, capsys):
    """2 -> 1: the global batch halves, so the epoch has twice the steps. Without the flag: one line naming both
    shapes and the flag, exit 2, nothing written. With it: the lr at every epoch's end is the uninterrupted run's,
    warm-up included, and it ends at 0 on the new schedule's last step."""
    run = _copy(data_runs["stopped"], tmp_path)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    capsys.readouterr()
    _one_process(["--output-dir", str(run), "--resume"], expect=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert ("was trained with 2 processes (--parallel data), a global batch of 16 (8 steps per epoch), this run "
            "has 1 process, a global batch of 8 (16 steps per epoch)") in err[0]
    assert "--rescale-schedule" in err[0] and "resume on 2 processes with --parallel data" in err[0]
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before

    _one_process(["--output-dir", str(run), "--resume", "--rescale-schedule"])
    assert "--rescale-schedule: the run trained with 2 processes" in capsys.readouterr().out
    ckpt = _ckpt(run)
    assert ckpt["schedule"] == {"world_size": 1, "parallel": "none", "global_batch": 8, "steps_per_epoch": 16,
                                "warmup_steps": 8, "total_steps": 32}
    # the 5 steps of 16 images, then 80 images of epoch 1 read: step 10 of 16, then the 16 of epoch 2
    assert ckpt["step"] == 5 + 6 + 16 and ckpt["epoch"] == 2 and ckpt["scheduler"]["last_epoch"] == 32
    assert _epoch_end_lrs(run) == pytest.approx(_epoch_end_lrs(data_runs["ref"]), abs=1e-12)
    assert _epoch_end_lrs(run)[-1] == 0.0
    # the flag is per invocation: a later resume does not inherit it (and needs none on 1 process)
    assert ckpt["config"]["rescale_schedule"] is True
    assert resume_io.resume_layer(ckpt, run / "last.pt").get("rescale_schedule") is None


@pytest.mark.slow  # 4 processes on this project's 2-core CPU: ~25 s
def test_two_ranks_resumed_on_four_is_rescaled(data_runs, tmp_path):
    """2 -> 4: the global batch doubles (4 steps an epoch); the lr of every epoch's end is the uninterrupted
    run's and the last epoch is not trained at lr 0 (before: the schedule's position ran past its end)."""
    run = _copy(data_runs["stopped"], tmp_path)
    _torchrun([*RUN, "--output-dir", str(run), "--resume", "--rescale-schedule"], ranks=4)
    ckpt = _ckpt(run)
    assert ckpt["schedule"]["world_size"] == 4 and ckpt["schedule"]["global_batch"] == 32
    assert ckpt["scheduler"]["last_epoch"] == ckpt["schedule"]["total_steps"] == 8
    assert ckpt["step"] == 5 + 2 + 4  # 80 images of epoch 1 read: step 2 of 4, then epoch 2
    assert _epoch_end_lrs(run) == pytest.approx(_epoch_end_lrs(data_runs["ref"]), abs=1e-12)
    assert min(line["lr"] for line in _lines(run)[:-1]) > 0


@pytest.mark.slow  # two more torchrun launches (~40 s here); the refusal's wording: test_the_shape_check_...
def test_a_module_parallel_run_resumed_with_parallel_data_is_rescaled(data_runs, tmp_path):
    """--parallel modules (every rank reads the batch: global batch 8) -> --parallel data on 2 ranks (16)."""
    run = tmp_path / "modules"
    _torchrun([*RUN, "--output-dir", str(run), "--parallel", "modules", "--partition", "blocks", "--max-steps", "5"])
    assert _ckpt(run)["schedule"]["parallel"] == "modules"
    _torchrun([*RUN, "--output-dir", str(run), "--resume", "--parallel", "data", "--rescale-schedule"])
    ckpt = _ckpt(run)
    assert ckpt["scheduler"]["last_epoch"] == ckpt["schedule"]["total_steps"] == 16
    assert ckpt["step"] == 5 + 6 + 8  # 40 images of epoch 1 read: step 2 of 8
    assert _epoch_end_lrs(run) == pytest.approx(_epoch_end_lrs(data_runs["ref"]), abs=1e-12)


def test_the_shape_check_names_what_changed():
    """check_schedule without processes: the same global batch passes (a module-parallel run on another P, or in
    one process), another is refused or, with the flag, handed back for rescaling; checkpoints from before the
    record are checked by their steps per epoch when an epoch is complete."""
    shape = resume_io.schedule_shape(2, "modules", 8, 16, 8, 32)
    one = resume_io.schedule_shape(1, "none", 8, 16, 8, 32)
    assert resume_io.check_schedule({"schedule": shape}, one, False, "x.pt") is None
    two = resume_io.schedule_shape(2, "data", 16, 8, 4, 16)
    with pytest.raises(ValueError, match=r"^checkpoint x.pt was trained with 2 processes \(--parallel modules\), a "
                                         r"global batch of 8 \(16 steps per epoch\), this run has 2 processes "
                                         r"\(--parallel data\), a global batch of 16 \(8 steps per epoch\): .*; "
                                         r"resume in one process or with --parallel modules \(any number of "
                                         r"processes\), or pass --rescale-schedule"):
        resume_io.check_schedule({"schedule": shape}, two, False, "x.pt")
    data = resume_io.schedule_shape(4, "data", 32, 4, 2, 8)
    with pytest.raises(ValueError, match=r"a global batch of 8 \(16 steps per epoch\), this run has 4 processes "
                                         r"\(--parallel data\), a global batch of 32 .*--rescale-schedule"):
        resume_io.check_schedule({"schedule": shape}, data, False, "x.pt")
    assert resume_io.check_schedule({"schedule": shape}, data, True, "x.pt") == shape
    assert resume_io.rescaled_epoch_step(5, shape, data) == 1  # 40 images read: 1 step of 32, none skipped
    legacy = {"epoch": 1, "step": 21, "epoch_step": 5}  # 16 steps an epoch
    assert resume_io.check_schedule(legacy, one, False, "x.pt") is None
    with pytest.raises(ValueError, match="trained with 16 steps per epoch, this run has 4 processes"):
        resume_io.check_schedule(legacy, data, False, "x.pt")
    assert resume_io.rescaled_epoch_step(8, {"steps_per_epoch": 16}, data) == 2  # half the epoch
    assert resume_io.check_schedule({"epoch": 0, "step": 3, "epoch_step": 3}, data, False, "x.pt") is None


# ---------------------------------------------------------------------------- exact data-parallel resume, 4. 7.
def _launch(args: list[str], ranks: int, log: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "mlaan", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def test_sigterm_under_torchrun_stops_every_rank_says_so_once_and_resumes_bit_identically(data_runs, tmp_path):
    """SIGTERM to torchrun (a cluster's preemption) while 2 ranks train: every rank finishes its step and stops at
    the same one, the line saying how to resume is printed once (before: by every rank), and the resumed run on
    2 ranks ends bit-identical to the uninterrupted one (before: each rank's random streams were reseeded, not
    restored: max |dw| 0.76 after 8 steps)."""
    run = tmp_path / "run"
    # --save-every 1: the first last.pt says that training is under way (saves change nothing in the run)
    proc = _launch([*RUN, "--output-dir", str(run), "--save-every", "1"], 2, tmp_path / "err.log")
    deadline = time.monotonic() + 240
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    output = out + (tmp_path / "err.log").read_text()
    stopped = [x for x in output.replace("\r", "\n").splitlines() if x.startswith("mlaan: stopped by SIGTERM")]
    assert len(stopped) == 1, output[-3000:]
    assert f"resume with: mlaan train --output-dir {run} --resume" in stopped[0]
    step = _ckpt(run)["step"]
    assert 0 < step < 16, stopped  # stopped in training, not at its end
    assert len(_ckpt(run)["rng_ranks"]) == 2
    _torchrun([*RUN, "--output-dir", str(run), "--resume"])
    assert _ckpt(run)["step"] == 16
    _assert_same_weights(data_runs["ref"], run)


# ---------------------------------------------------------------------------------------- --boundary cut, 3.
CUT = [*RUN, "--epochs", "1", "--synthetic-train-size", "64", "--parallel", "modules", "--boundary", "cut",
       "--partition", "blocks"]


def test_cut_boundaries_are_carried_over_as_the_algorithm(tmp_path, capsys):
    """A --boundary cut run on 2 ranks stopped after 3 steps and resumed in one process keeps its cascades cut
    where its ranks met (before: dropped, weights up to 5.0 apart from the 2-rank continuation); the checkpoint
    it writes says so, and a resume on 3 ranks, which would cut elsewhere, is refused in one line. Reference: one
    process with the cascades cut after module 1 (the algorithm --boundary cut on 2 ranks is, docs/PARALLELISM.md)
    from the start."""
    from mlaan.training import make_trainer

    ref, run = tmp_path / "ref", tmp_path / "run"
    threads = torch.get_num_threads()
    options = dict(device="cpu", dataset="synthetic", synthetic_train_size=64, synthetic_test_size=16,
                   arch="resnet20", local_modules=4, method="dgl+mlaan", epochs=1, batch_size=8, threads=1, seed=2,
                   parallel="modules", boundary="cut", partition="blocks")  # CUT's
    trainer = make_trainer(None, {**options, "warmup_epochs": 0.5, "output_dir": str(ref)}, log=lambda m: None)
    try:
        trainer.local_model.options.cascade_barriers = (1,)
        trainer.fit()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    _torchrun([*CUT, "--output-dir", str(run), "--max-steps", "3"])
    assert _ckpt(run)["cascade_barriers"] == [1] and _ckpt(run)["pipeline"]["ranges"] == [[0, 2], [2, 4]]
    one_process = ["train", *CUT, "--output-dir", str(run), "--resume"]
    try:
        assert main([*one_process, "--max-steps", "5"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert _ckpt(run)["cascade_barriers"] == [1] and "pipeline" not in _ckpt(run)
    output = _torchrun([*CUT, "--output-dir", str(run), "--resume"], ranks=3, expect=1)
    line = ("this run cuts its MLM cascades after local module 1, the rank boundaries of 2 processes (--boundary "
            "cut); on 3 processes they would be cut elsewhere, another algorithm: resume it on 2 processes or in "
            "one process")
    assert output.count(line) == 1, output[-3000:]
    try:
        assert main(one_process) == 0
    finally:
        torch.set_num_threads(threads)
    _assert_same_weights(ref, run)
