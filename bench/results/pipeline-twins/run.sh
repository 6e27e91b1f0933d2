#!/bin/sh
# Issue 33: the multi-device cost model for the paper's LAM trunk (copies) and the twins trunk, back to back on
# one machine, from the setting of the saved 2-rank ResNet-32 K=16 dgl+mlaan pipeline run (starts no processes;
# one thread a device; ~4 minutes each here). The twins' prediction is of a pipeline the product does not run.
cd "$(dirname "$0")/../../.."   # the repository root
HERE=bench/results/pipeline-twins
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/mlaan bench pipeline --predict-from bench/results/pipeline-dgl+mlaan/pipeline.json \
  --predict-repeats 5 --output-dir $HERE/copies
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/mlaan bench pipeline --predict-from bench/results/pipeline-dgl+mlaan/pipeline.json \
  --predict-repeats 5 --option lam_trunk=twins --output-dir $HERE/twins
