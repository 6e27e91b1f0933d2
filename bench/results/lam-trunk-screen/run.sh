#!/bin/sh
# LAM trunk screen (issues 32 and 33): ResNet-32 K=16 on 10k Fashion-MNIST images, 3 epochs, seeds 0 and 1:
# bp, dgl, dgl+mlaan with the paper's trunk (trained copies + EMA twin) and with the EMA twins alone
# (--lam-trunk twins). Resumable, one thread a run; rerun the same command to continue.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench accuracy --arch resnet32 --k 16 \
    --methods bp,dgl,dgl+mlaan --vary lam_trunk=copies,twins --seeds 0,1 --modules --jobs 1 --threads 1 \
    --epochs 3 --train-samples 10000 --batch-size 128 --lr 0.1 --warmup-epochs 0.2 \
    --output-dir runs/lam-trunk-screen   # results copied to bench/results/lam-trunk-screen
