#!/usr/bin/env bash
# On a CUDA machine: peak-memory benchmark with real CUDA figures, the CPU accounting checked against them,
# and a short Fashion-MNIST accuracy comparison; about 8 minutes in all. Results go to the folder given.
#
#   bench/gpu.sh OUT_DIR
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3; needs torch with CUDA),
# DATA_ROOT (a folder holding Fashion-MNIST's four IDX .gz files; default: ./data, then Debian's
# /usr/share/datasets/fashion-mnist; without it the accuracy part is skipped), BATCH (default 1024).
# Nothing is downloaded or installed. Each part has its own time limit, so one slow part cannot eat the rest.
set -uo pipefail

OUT=${1:?usage: bench/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
BATCH=${BATCH:-1024}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu.sh $(elapsed)s] $*" | tee -a "$OUT/gpu.log"; }

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to $PYTHON: nothing to do (the CPU figures come from 'mlaan bench memory')"
    exit 1
fi
CARD=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" > "$OUT/versions.txt"
log "card: $CARD; python: $PYTHON; batch $BATCH"

METHODS=bp,dgl,dgl+mlaan,infopro,infopro+mlaan,dgl+mlm,dgl+lam

# 1. Peak memory, torch.cuda.max_memory_allocated around 2 steps after 1 warm-up, every case in one process
#    (the peak counter is reset per case; what a previous case left allocated is subtracted).
log "1/3 memory (CUDA max_memory_allocated): resnet32 K=1,2,4,8,16; resnet110 K=1,4,8,16,32,55"
timeout 270 "$PYTHON" -m mlaan.bench.cli bench memory --device cuda --mode cuda --batch "$BATCH" --steps 2 \
    --warmup 1 --no-isolate --methods "$METHODS" --output-dir "$OUT/memory-cuda" 2>&1 | tee "$OUT/memory-cuda.log"
log "memory done (exit ${PIPESTATUS[0]})"

# 2. The exact accounting (what the CPU benchmark reports) on the same card, for the headline cases: it
#    should match max_memory_allocated up to kernel workspaces and allocator rounding.
log "2/3 accounting on CUDA vs max_memory_allocated: resnet32 K=16, resnet110 K=55"
timeout 60 "$PYTHON" -m mlaan.bench.cli bench memory --device cuda --mode account --batch "$BATCH" \
    --archs resnet32 --ks 16 --methods bp,dgl+mlaan --no-isolate --output-dir "$OUT/memory-account-r32" \
    2>&1 | tee "$OUT/memory-account.log"
timeout 45 "$PYTHON" -m mlaan.bench.cli bench memory --device cuda --mode account --batch "$BATCH" \
    --archs resnet110 --ks 55 --methods bp,dgl+mlaan --no-isolate --output-dir "$OUT/memory-account-r110" \
    2>&1 | tee -a "$OUT/memory-account.log"

# 3. A short accuracy comparison on Fashion-MNIST (every method: same seed, recipe, 3 epochs of 20k images).
DATA=${DATA_ROOT:-}
if [ -z "$DATA" ]; then
    for d in data data/fashion-mnist /usr/share/datasets/fashion-mnist; do
        if [ -f "$d/train-images-idx3-ubyte.gz" ]; then DATA=$d; break; fi
    done
fi
LEFT=$(( 470 - $(elapsed) ))
if [ -z "$DATA" ]; then
    log "3/3 accuracy skipped: no Fashion-MNIST found (set DATA_ROOT)"
elif [ "$LEFT" -lt 60 ]; then
    log "3/3 accuracy skipped: only ${LEFT}s left of the 8 minutes"
else
    log "3/3 accuracy on Fashion-MNIST from $DATA (${LEFT}s left)"
    timeout "$LEFT" "$PYTHON" -m mlaan.bench.cli bench accuracy --device cuda --data-root "$DATA" --epochs 3 \
        --train-samples 20000 --batch-size 128 --lr 0.1 --output-dir "$OUT/accuracy" 2>&1 | tee "$OUT/accuracy.log"
    log "accuracy done (exit ${PIPESTATUS[0]})"
fi

{
    echo "# bench/gpu.sh on $CARD"
    echo
    echo "$(cat "$OUT/versions.txt"); batch $BATCH; $(elapsed) s in all"
    for f in memory-cuda/memory.md memory-account-r32/memory.md memory-account-r110/memory.md accuracy/report.md; do
        if [ -f "$OUT/$f" ]; then echo; echo "## $f"; echo; cat "$OUT/$f"; fi
    done
} > "$OUT/SUMMARY.md"
log "wrote $OUT/SUMMARY.md"
