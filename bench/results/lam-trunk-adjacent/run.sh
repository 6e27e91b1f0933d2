#!/bin/sh
# Is the twins trunk's short-screen gap (bench/results/lam-trunk-screen: 2.4 points behind the paper's trunk; not
# the EMA's lag: bench/results/lam-trunk-ema) the blocks uniform sampling skips, which frozen twins cannot learn
# to bridge? The same recipe (ResNet-32 K=16, 10k Fashion-MNIST images, 3 epochs, seeds 0 and 1) with trunks of
# the twins of the blocks right after each module (--lam-sampling adjacent). Paired with the screen's finished
# runs (--merge). Resumable, one thread a run; rerun the same command to continue. Results copied into this folder.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 exec nice -n 5 .venv/bin/mlaan bench accuracy --arch resnet32 --k 16 \
    --methods dgl+mlaan --arm "twins-adjacent=--lam-trunk twins --lam-sampling adjacent" --seeds 0,1 --modules \
    --jobs 2 --threads 1 --epochs 3 --train-samples 10000 --batch-size 128 --lr 0.1 --warmup-epochs 0.2 \
    --merge bench/results/lam-trunk-screen/accuracy.json --output-dir runs/lam-trunk-adjacent "$@"
