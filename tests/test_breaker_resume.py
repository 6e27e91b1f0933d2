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
