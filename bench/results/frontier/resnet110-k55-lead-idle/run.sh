#!/bin/sh
# Where MLAAN goes below checkpointed BP (ResNet-110 K=55), with --checkpoint-trunk lead: recompute only each LAM
# trunk's lead (the copy and EMA twin at the module's resolution), everywhere (lead) or in the first 36 / 24 local
# modules (the 32x32 and 16x16 stages: lead36, lead24), beside full recomputation, plain dgl+mlaan, bp and BP's
# checkpointed blocks and best segments (s=3): one interleaved run of 3 rounds, batch 256 accounted, 128 timed, one
# thread. Run it with nothing else on the machine.
cd "$(dirname "$0")/../../../.."   # the repository root
OMP_NUM_THREADS=1 exec .venv/bin/mlaan bench frontier --arch resnet110 --ks 55 --methods bp,dgl+mlaan \
    --segments 1,3 --batch 256 --time-batch 128 --repeats 3 --warmup 1 --threads 1 \
    --variant lead=checkpoint_trunk=lead --variant lead36=checkpoint_modules=36,checkpoint_trunk=lead \
    --variant lead24=checkpoint_modules=24,checkpoint_trunk=lead \
    --output-dir bench/results/frontier/resnet110-k55-lead-idle "$@"
