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
