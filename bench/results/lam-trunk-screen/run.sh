#!/bin/sh
# LAM trunk screen (issues 32 and 33): ResNet-32 K=16 on 10k Fashion-MNIST images, 3 epochs, seeds 0 and 1:
# bp, dgl, dgl+mlaan with the paper's trunk (trained copies + EMA twin) and with the EMA twins alone
# (--lam-trunk twins). Resumable, one thread a run; rerun the same command to continue. Runs finished on an
# earlier machine are in this folder's accuracy.json (committed): --merge keeps them. About 40 minutes with
# --jobs 2 on a 2-core Xeon (dgl+mlaan ~4.6 s a step of 128 on one thread).
cd "$(dirname "$0")/../../.."   # the repository root
HERE=bench/results/lam-trunk-screen
MERGE=""; [ -f "$HERE/accuracy.json" ] && MERGE="--merge $HERE/accuracy.json"
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench accuracy --arch resnet32 --k 16 \
    --methods bp,dgl,dgl+mlaan --vary lam_trunk=copies,twins --seeds 0,1 --modules --jobs 2 --threads 1 \
    --epochs 3 --train-samples 10000 --batch-size 128 --lr 0.1 --warmup-epochs 0.2 \
    $MERGE --output-dir runs/lam-trunk-screen "$@"   # results copied to bench/results/lam-trunk-screen
