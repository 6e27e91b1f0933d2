#!/bin/sh
# Issue 33's time target for the paper's trunk, on idle cores: ResNet-32 K=16 dgl+mlaan <= 35% of BP at <= 1.2x
# plain dgl+mlaan's step. Selective recomputation (checkpoint_modules N: recompute only in the first N local
# modules, where the peak is made) for N = 4, 6, 8 beside full recomputation, plain dgl+mlaan, bp and
# checkpointed bp, in one interleaved run of 5 rounds (the earlier run, resnet32-k16-selective, was at load 8.7).
# Batch 256 accounted, 128 timed, one thread; run it with nothing else on the machine.
cd "$(dirname "$0")/../../../.."   # the repository root
OMP_NUM_THREADS=1 exec .venv/bin/mlaan bench frontier --arch resnet32 --ks 16 --methods bp,dgl+mlaan \
    --segments 1 --batch 256 --time-batch 128 --repeats 5 --warmup 1 --threads 1 \
    --variant sel4=checkpoint_modules=4 --variant sel6=checkpoint_modules=6 --variant sel8=checkpoint_modules=8 \
    --output-dir bench/results/frontier/resnet32-k16-selective-idle "$@"
