#!/bin/sh
# The LAM trunks' costs side by side (issue 33): the paper's copies, the twins alone and copy+twins, with and
# without recomputation, against bp, checkpointed bp and dgl; ResNet-32 K=16, batch 256 accounted, 128 timed.
cd "$(dirname "$0")/../../../.."   # the repository root
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench frontier --arch resnet32 --ks 16 --methods bp,dgl,dgl+mlaan \
    --segments 1 --batch 256 --time-batch 128 --repeats 3 --warmup 1 --threads 1 --variant twins=lam_trunk=twins \
    --variant copytwins=lam_trunk=copy+twins --output-dir bench/results/frontier/resnet32-k16-copytwins-icelake "$@"
