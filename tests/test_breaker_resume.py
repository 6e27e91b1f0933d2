"""Breaker findings on resume, data-parallel runs and the run-state tools: each test failed before its fix.

Tiny synthetic runs on CPU; the 2-process ones under torchrun with gloo, one thread per process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import _torchrun

TINY = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "16",
        "--arch", "resnet20", "-K", "4", "--method", "dgl+mlaan", "--batch-size", "16", "--threads", "1",
        "--seed", "3"]


def _lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_data_parallel_module_losses_are_not_divided_by_the_world_size(tmp_path):
    """Under --parallel data an epoch's per-module losses were averaged over ranks after their counts were
    summed: train_independent_losses came out halved on 2 ranks (the last module's own loss is the train loss)."""
    out = tmp_path / "dp"
    _torchrun([*TINY, "--parallel", "data", "--epochs", "1", "--output-dir", str(out)])
    (line,) = _lines(out)
    assert line["train_independent_losses"][-1] == pytest.approx(line["train_loss"], rel=1e-6)
    assert line["train_cascaded_losses"][-1] == pytest.approx(line["train_loss"], rel=1e-6)
    assert all(v > 1.0 for v in line["train_independent_losses"])  # ~ln(10) at the start, not half of it


@pytest.mark.parametrize("content", [None, "root:x:0:0:root:/root:/bin/bash\n", "[1]"])
def test_bench_frontier_refuses_an_accuracy_path_that_is_no_report(tmp_path, capsys, content):
    """`bench frontier --accuracy PATH` named by hand: a missing file or a non-report was silently ignored (no
    annotation), a JSON list crashed with AttributeError after the whole measurement. Now one line, exit 2,
    before anything is measured or written."""
    from mlaan.cli import main

    path = tmp_path / "accuracy.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "fr"
    code = main(["bench", "frontier", "--arch", "resnet20", "--ks", "2", "--methods", "bp", "--segments", "1",
                 "--batch", "2", "--threads", "1", "--repeats", "1", "--warmup", "0", "--accuracy", str(path),
                 "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mlaan: error: --accuracy ") and err.count("\n") == 1, err
    assert not (out / "frontier.json").exists()


def _assert_same_epoch_figures(a: dict, b: dict) -> None:
    """The epoch's train loss, accuracy and per-module losses of two metrics.jsonl lines agree to 1e-9."""
    for key in ("train_loss", "train_accuracy", "train_independent_losses", "train_cascaded_losses"):
        x, y = ([v for v in line[key] if v is not None] if isinstance(line[key], list) else line[key]
                for line in (a, b))
        assert x == pytest.approx(y, rel=1e-9), key


def test_data_parallel_resume_mid_epoch_logs_the_uninterrupted_figures(tmp_path):
    """A 2-rank run stopped mid-epoch and resumed on 2 ranks: its weights were bit-identical, but the epoch's
    train loss/accuracy were not (the checkpoint held rank 0's sums only, restored on every rank and counted
    twice). The checkpoint now holds every rank's sums, restored once; so do a 2 -> 1 and a 1 -> 2 rescale."""
    run = [*TINY, "--parallel", "data", "--epochs", "1", "--batch-size", "8"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    _torchrun([*run, "--output-dir", str(ref)])
    _torchrun([*run, "--output-dir", str(stopped), "--max-steps", "2"])
    _torchrun(["--resume", str(stopped)])
    (a,), (b,) = _lines(ref), _lines(stopped)
    _assert_same_epoch_figures(a, b)


def test_rescaled_resume_counts_each_image_of_the_epoch_once(tmp_path):
    """1 process stopped after 3 of 4 steps, resumed on 2 ranks with --rescale-schedule: the epoch continues
    after the 48 images read (1 step of 32, rounded down) and the log's images are 48 + 32 (the earlier steps were
    counted on every rank: 2 x 48 + 32 reported)."""
    import torch

    from mlaan.cli import main

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *TINY, "--epochs", "1", "--max-steps", "3", "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (stopped,) = _lines(out)
    _torchrun(["--resume", str(out), "--parallel", "data", "--rescale-schedule"])
    (line,) = _lines(out)
    assert line["complete"] and line["step"] == 4
    per_second, seconds = line["images_per_second"], line["epoch_seconds"]
    assert per_second * seconds == pytest.approx(48 + 32, rel=1e-6)
    assert line["train_independent_losses"][-1] == pytest.approx(line["train_loss"], rel=1e-9)
    assert stopped["train_loss"] != line["train_loss"]


def test_pipelined_resume_mid_epoch_logs_the_uninterrupted_figures(tmp_path):
    """--parallel modules stopped mid-epoch and resumed on 2 ranks: the checkpoint held the first rank's sums
    only (its modules' losses, no loss or accuracy: the last rank has those), so the resumed epoch's figures
    lost the steps before the stop."""
    run = [*TINY, "--parallel", "modules", "--epochs", "1", "--batch-size", "8"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    _torchrun([*run, "--output-dir", str(ref)])
    _torchrun([*run, "--output-dir", str(stopped), "--max-steps", "3"])
    _torchrun(["--resume", str(stopped)])
    (a,), (b,) = _lines(ref), _lines(stopped)
    _assert_same_epoch_figures(a, b)
    assert a["images_per_second"] * a["epoch_seconds"] == pytest.approx(64, rel=1e-6)
    assert b["images_per_second"] * b["epoch_seconds"] == pytest.approx(64, rel=1e-6)


def test_report_of_a_file_says_it_is_a_file(tmp_path, capsys):
    """`mlaan report RUN/metrics.json` said "run folder '.../metrics.json' does not exist" of a file that does."""
    from mlaan.cli import main

    path = tmp_path / "metrics.json"
    path.write_text("{}")
    assert main(["report", str(path), "--output-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlaan: error: ") and err.count("\n") == 1 and "is a file" in err, err
    assert "does not exist" not in err


def test_rescaled_resume_at_the_end_of_an_epoch_trains_no_leftover_batch(tmp_path):
    """1 process stopped after 3 steps (48 images), resumed on 3 ranks (global batch 48, 1 step an epoch: 22
    images a rank, the last 6 left out) with --rescale-schedule: epoch 1 is done, yet the resumed loader, whose
    left-out rule looked at the 6 images left rather than the epoch, trained an extra step of 6 images a rank
    (epoch 1 logged at step 4, the lr schedule one step ahead: lr 0 before epoch 2)."""
    import torch

    from mlaan.cli import main

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *TINY, "--epochs", "2", "--max-steps", "3", "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    _torchrun(["--resume", str(out), "--parallel", "data", "--rescale-schedule"], ranks=3)
    first, second = _lines(out)
    assert (first["step"], second["step"]) == (3, 4)
    assert first["images_per_second"] * first["epoch_seconds"] == pytest.approx(48, rel=1e-6)
    assert first["lr"] > 0 and second["lr"] == 0
