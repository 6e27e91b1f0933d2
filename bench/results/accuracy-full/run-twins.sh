#!/bin/sh
# dgl+mlaan --lam-trunk twins on the full Fashion-MNIST recipe of this folder (issue 33): seeds 0 and 1, one
# thread a run, two at a time; about 5 hours a run on the Ice Lake Xeon (2.4-2.7 s a step), so it spans sessions:
# resumable, rerun the same command to continue (a run saves every 100 steps). Compared, paired by seed, with the
# finished bp/dgl/dgl+mlaan runs of accuracy.json (--merge keeps them; nothing of them is retrained).
# When both seeds have finished: sh run-twins.sh --report-only --modules, then copy runs/accuracy-full-twins/
# accuracy.{md,json}, curves.png and each twins seed's metrics/modules into twins/ here.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench accuracy --arch resnet32 --k 16 \
    --methods dgl+mlaan --vary lam_trunk=twins --seeds 0,1 --jobs 2 --threads 1 \
    --epochs 15 --train-samples 0 --batch-size 128 --lr 0.1 --weight-decay 5e-4 --warmup-epochs 1 \
    --merge bench/results/accuracy-full/accuracy.json --output-dir runs/accuracy-full-twins "$@"
