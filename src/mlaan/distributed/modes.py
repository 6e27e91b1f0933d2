"""The choices of ``mlaan train --parallel/--boundary/--partition``, and how many processes torchrun started
(torch-free: ``mlaan --help`` lists the choices, and the CLI asks the world size before importing torch)."""

import os

TORCHRUN_VARS = ("RANK", "WORLD_SIZE")  # what torchrun sets for every process it starts

PARALLEL_MODES = ("data", "modules")  # torchrun processes split the batch, or the local modules
BOUNDARY_MODES = ("exact", "cut")  # MLM cascades across a rank boundary: waited for, or stopped there
PARTITION_MODES = ("time", "blocks", "memory")  # what the modules-per-rank split evens out


def env_world_size() -> int:
    """The number of processes torchrun started this one among (RANK and WORLD_SIZE set, as
    :func:`mlaan.distributed.context.init_from_env` requires them); 1 outside torchrun or for a WORLD_SIZE that is
    not a number."""
    world = os.environ.get("WORLD_SIZE", "")
    if not all(v in os.environ for v in TORCHRUN_VARS) or not world.isdigit():
        return 1
    return max(1, int(world))
