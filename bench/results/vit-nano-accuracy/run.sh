#!/bin/sh
# Converged ViT accuracy study (issue 32): resumable, one thread a run; rerun the same command to continue.
# Runs finished on an earlier machine are in this folder's accuracy.json (committed): --merge keeps them, so a
# new machine trains only what is missing. Refresh it with: sh run.sh --report-only, then copy accuracy.* here.
cd "$(dirname "$0")/../../.."   # the repository root
HERE=bench/results/vit-nano-accuracy
MERGE=""; [ -f "$HERE/accuracy.json" ] && MERGE="--merge $HERE/accuracy.json"
OMP_NUM_THREADS=1 exec .venv/bin/mlaan bench accuracy --arch vit_nano_patch8_32 --k 4 \
    --methods bp,dgl,dgl+mlaan --vary lam_trunk=copies,twins --seeds 0,1 --modules --jobs 2 --threads 1 \
    --epochs 10 --train-samples 0 --batch-size 128 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 1 \
    --train-arg="--opt adamw --label-smoothing 0.1 --clip-grad 1.0 --window 2 --lam-depth 2" \
    $MERGE --output-dir runs/vit-nano/accuracy "$@"
