"""The choices of ``mlaan train --parallel/--boundary/--partition`` (torch-free: ``mlaan --help`` lists them)."""

PARALLEL_MODES = ("data", "modules")  # torchrun processes split the batch, or the local modules
BOUNDARY_MODES = ("exact", "cut")  # MLM cascades across a rank boundary: waited for, or stopped there
PARTITION_MODES = ("time", "blocks", "memory")  # what the modules-per-rank split evens out
