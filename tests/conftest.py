import os

import pytest
import torch

# Runs started by the tests (in-process or as subprocesses) keep torch's thread count instead of sampling the
# idle cores (mlaan.runtime.choose_threads), so that two halves of a resume test use the same count.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the benchmarks and reports save (mlaan.bench.common.save_figure), in order, saved as usual
    and kept for the test to inspect (drawn: their ticks and layout are those of the PNG)."""
    from mlaan.bench import common

    kept = []
    save = common.save_figure

    def keep(fig, path):
        save(fig, path)
        kept.append(fig)

    monkeypatch.setattr(common, "save_figure", keep)
    return kept
