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
