#!/bin/sh
# Does one trained block give the twins trunk back what it lacks? The twins trunk's short-screen gap
# (bench/results/lam-trunk-screen: 2.4 points behind the paper's trunk) was neither the EMA's lag nor the skipped
# blocks (lam-trunk-ema, lam-trunk-adjacent) but the trunk being frozen. --lam-trunk copy+twins keeps the paper's
# first trunk block (a trained copy of the first later block plus its EMA twin) and runs the shared twins after
# it. The same recipe (ResNet-32 K=16, 10k Fashion-MNIST images, 3 epochs = 235 steps, seeds 0 and 1), paired
# with the screen's finished runs (--merge). Resumable, one thread a run; rerun the same command to continue.
# Results copied into this folder.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench accuracy --arch resnet32 --k 16 \
    --methods dgl+mlaan --vary lam_trunk=copy+twins --seeds 0,1 --modules \
    --jobs 2 --threads 1 --epochs 3 --train-samples 10000 --batch-size 128 --lr 0.1 --warmup-epochs 0.2 \
    --merge bench/results/lam-trunk-screen/accuracy.json --output-dir runs/lam-trunk-copy-twins "$@"
