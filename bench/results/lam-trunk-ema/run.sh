#!/bin/sh
# Is the twins trunk's short-screen gap (bench/results/lam-trunk-screen: 2.4 points behind the paper's trunk) the
# EMA's lag? The same recipe (ResNet-32 K=16, 10k Fashion-MNIST images, 3 epochs = 235 steps, seeds 0 and 1) with
# the twins following their blocks 10x faster: ema_momentum 0.95 (time constant 20 steps against 0.995's 200, which
# leaves 31% of a twin's initial weights after 235 steps). Paired with the screen's finished runs (--merge).
# Resumable, one thread a run; rerun the same command to continue. Results copied into this folder.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench accuracy --arch resnet32 --k 16 \
    --methods dgl+mlaan --arm "twins-m0.95=--lam-trunk twins --ema-momentum 0.95" --seeds 0,1 --modules \
    --jobs 2 --threads 1 --epochs 3 --train-samples 10000 --batch-size 128 --lr 0.1 --warmup-epochs 0.2 \
    --merge bench/results/lam-trunk-screen/accuracy.json --output-dir runs/lam-trunk-ema "$@"
