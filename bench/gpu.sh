#!/usr/bin/env bash
# On a CUDA machine: bp, dgl and dgl+mlaan on full Fashion-MNIST with the data on the GPU (--data-on-device),
# then the peak-memory benchmark with real CUDA figures and the CPU accounting checked against them; about 8
# minutes in all. Results go to the folder given.
#
#   bench/gpu.sh OUT_DIR
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3; needs torch with CUDA),
# DATA_ROOT (a folder holding Fashion-MNIST's four IDX .gz files; default: ./data, then Debian's
# /usr/share/datasets/fashion-mnist; without it the accuracy part is skipped), EPOCHS (of the accuracy runs,
# default 4: what fits in ~5 minutes if an epoch of dgl+mlaan takes ~60 s), BATCH (of the memory runs, default 1024).
# Nothing is downloaded or installed. Each part has its own time limit, so one slow part cannot eat the rest.
set -uo pipefail

source "$(dirname "$0")/gpu_common.sh"   # OUT, the repository root, PYTHON, elapsed, log
BATCH=${BATCH:-1024}
EPOCHS=${EPOCHS:-4}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to $PYTHON: nothing to do (the CPU figures come from 'mlaan bench memory')"
    exit 1
fi
CARD=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" > "$OUT/versions.txt"
log "card: $CARD; python: $PYTHON; batch $BATCH"

left() { echo $(( 470 - $(elapsed) )); }
cap() { local n=$1 l; l=$(left); l=$(( l < 1 ? 1 : l )); echo $(( n < l ? n : l )); }  # timeout 0 = none

# 1. bp, dgl and dgl+mlaan, side by side on the card, the CPU comparison's recipe (BENCHMARKS.md "Full
#    Fashion-MNIST") cut to EPOCHS epochs; the images live on the GPU and each batch is cropped and flipped there.
#    A run the time limit stops saves its checkpoint, and the report covers the runs that finished.
DATA=${DATA_ROOT:-}
if [ -z "$DATA" ]; then
    for d in data data/fashion-mnist /usr/share/datasets/fashion-mnist; do
        if [ -f "$d/train-images-idx3-ubyte.gz" ]; then DATA=$d; break; fi
    done
fi
if [ -z "$DATA" ]; then
    log "1/3 accuracy skipped: no Fashion-MNIST found (set DATA_ROOT)"
else
    log "1/3 accuracy: bp, dgl, dgl+mlaan on Fashion-MNIST from $DATA, $EPOCHS epochs, data on the GPU"
    timeout "$(cap 300)" "$PYTHON" -m mlaan.bench.cli bench accuracy --device cuda --data-root "$DATA" \
        --methods bp,dgl,dgl+mlaan --jobs 3 --epochs "$EPOCHS" --train-samples 0 --batch-size 128 --lr 0.1 \
        --weight-decay 5e-4 --warmup-epochs 1 --train-arg=--data-on-device --output-dir "$OUT/accuracy" \
        2>&1 | tee "$OUT/accuracy.log"
    log "accuracy done (exit ${PIPESTATUS[0]})"
fi

METHODS=bp,dgl,dgl+mlaan,infopro,infopro+mlaan,dgl+mlm,dgl+lam

# 2. Peak memory, torch.cuda.max_memory_allocated around 2 steps after 1 warm-up, every case in one process
#    (the peak counter is reset per case; what a previous case left allocated is subtracted).
log "2/3 memory (CUDA max_memory_allocated): resnet32 K=1,2,4,8,16; resnet110 K=1,4,8,16,32,55"
timeout "$(cap 200)" "$PYTHON" -m mlaan.bench.cli bench memory --device cuda --mode cuda --batch "$BATCH" \
    --steps 2 --warmup 1 --no-isolate --methods "$METHODS" --output-dir "$OUT/memory-cuda" 2>&1 \
    | tee "$OUT/memory-cuda.log"
log "memory done (exit ${PIPESTATUS[0]})"

# 3. The exact accounting (what the CPU benchmark reports) on the same card, for the headline cases: it
#    should match max_memory_allocated up to kernel workspaces and allocator rounding.
log "3/3 accounting on CUDA vs max_memory_allocated: resnet32 K=16, resnet110 K=55"
timeout "$(cap 40)" "$PYTHON" -m mlaan.bench.cli bench memory --device cuda --mode account --batch "$BATCH" \
    --archs resnet32 --ks 16 --methods bp,dgl+mlaan --no-isolate --output-dir "$OUT/memory-account-r32" \
    2>&1 | tee "$OUT/memory-account.log"
timeout "$(cap 30)" "$PYTHON" -m mlaan.bench.cli bench memory --device cuda --mode account --batch "$BATCH" \
    --archs resnet110 --ks 55 --methods bp,dgl+mlaan --no-isolate --output-dir "$OUT/memory-account-r110" \
    2>&1 | tee -a "$OUT/memory-account.log"

{
    echo "# bench/gpu.sh on $CARD"
    echo
    echo "$(cat "$OUT/versions.txt"); $EPOCHS epochs; memory batch $BATCH; $(elapsed) s in all"
    for f in accuracy/accuracy.md memory-cuda/memory.md memory-account-r32/memory.md memory-account-r110/memory.md; do
        if [ -f "$OUT/$f" ]; then echo; echo "## $f"; echo; cat "$OUT/$f"; fi
    done
} > "$OUT/SUMMARY.md"
log "wrote $OUT/SUMMARY.md"
