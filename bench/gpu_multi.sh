#!/usr/bin/env bash
# On a machine with N >= 2 CUDA GPUs: module parallelism for real (NCCL, one GPU a rank), about 5 minutes in all.
#   1. mlaan train --parallel modules under torchrun on the N GPUs, a few hundred steps on synthetic data (and on
#      Fashion-MNIST if it is here), each rank holding only its own modules;
#   2. mlaan bench pipeline --device cuda: the pipeline against one GPU, with each rank's parameters and CUDA peak
#      memory (max_memory_allocated) against one process training the whole model;
#   3. the per-module CUDA times the cost model needs (module_times.json: seconds per module at B, B/2, B/4, B/8,
#      for `mlaan bench pipeline --module-times`), and `--predict-from` on the pipeline run (its NCCL link).
# Results, a log (gpu_multi.log) and SUMMARY.md go to the folder given.
#
#   bench/gpu_multi.sh OUT_DIR
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3; torch with CUDA and NCCL), GPUS (how
# many to use, default: all visible), STEPS (training steps, default 300), BATCH (default 128), DATA_ROOT
# (Fashion-MNIST's four IDX .gz files; default ./data, then /usr/share/datasets/fashion-mnist; without it that run
# is skipped). DRY_CPU=1 runs the same commands on the CPU with gloo, 2 processes and tiny sizes (a check of the
# script itself, not a measurement). Nothing is downloaded or installed. Each part has its own time limit.
set -uo pipefail

source "$(dirname "$0")/gpu_common.sh"   # OUT, the repository root, PYTHON, elapsed, log
left() { echo $(( 360 - $(elapsed) )); }
cap() { local n=$1 l; l=$(left); l=$(( l < 1 ? 1 : l )); echo $(( n < l ? n : l )); }  # timeout 0 = none

if [ "${DRY_CPU:-0}" = 1 ]; then
    N=2; DEVICE=cpu; ARCH=resnet20; K=4; STEPS=4; BATCH=16; TEST=32; BENCH_BATCH=8
    TIMED=(--steps 1 --warmup 1 --rounds 1 --cores 2); TIMES_BATCH=8; THREADS=(--threads 1)
    CARD="CPU (DRY_CPU=1: gloo, tiny sizes; not a measurement)"
    export OMP_NUM_THREADS=1
else
    VISIBLE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    N=${GPUS:-$VISIBLE}
    if [ "${VISIBLE:-0}" -lt 2 ] || [ "$N" -lt 2 ] || [ "$N" -gt "$VISIBLE" ]; then
        log "needs 2 or more CUDA GPUs: $PYTHON sees ${VISIBLE:-0}, GPUS=${GPUS:-all}; nothing to do (one GPU: bench/gpu.sh)"
        exit 1
    fi
    DEVICE=cuda; ARCH=resnet32; K=16; STEPS=${STEPS:-300}; BATCH=${BATCH:-128}; TEST=2048; BENCH_BATCH=256
    TIMED=(--steps 10 --warmup 3 --rounds 2); TIMES_BATCH=$BENCH_BATCH; THREADS=()
    CARD="$N x $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")"
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" > "$OUT/versions.txt"
log "on $CARD; python: $PYTHON; $N ranks, $ARCH K=$K, $STEPS steps of $BATCH"

TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$N" -m mlaan)  # `timeout` runs it
TRAIN=(train --parallel modules --device "$DEVICE" --arch "$ARCH" -K "$K" --method dgl+mlaan --epochs 1
       --batch-size "$BATCH" --max-steps "$STEPS" --warmup-epochs 0.1 --partition blocks "${THREADS[@]}")

# 1. Training under torchrun: NCCL between the GPUs, activations and cascaded gradients as CUDA tensors, each rank
#    holding only its own modules; the merged last.pt is the usual one-process checkpoint.
log "1/3 train --parallel modules on $N ranks: synthetic data, $STEPS steps"
timeout "$(cap 90)" "${TORCHRUN[@]}" "${TRAIN[@]}" --dataset synthetic --synthetic-train-size $(( BATCH * STEPS )) \
    --synthetic-test-size "$TEST" --output-dir "$OUT/train-synthetic" --overwrite 2>&1 | tee "$OUT/train-synthetic.log"
log "synthetic run done (exit ${PIPESTATUS[0]})"
DATA=${DATA_ROOT:-}
if [ -z "$DATA" ]; then
    for d in data data/fashion-mnist /usr/share/datasets/fashion-mnist; do
        if [ -f "$d/train-images-idx3-ubyte.gz" ]; then DATA=$d; break; fi
    done
fi
if [ "${DRY_CPU:-0}" = 1 ]; then
    log "Fashion-MNIST run skipped: DRY_CPU=1"
elif [ -z "$DATA" ]; then
    log "Fashion-MNIST run skipped: no Fashion-MNIST found (set DATA_ROOT)"
else
    log "1/3 train --parallel modules on $N ranks: Fashion-MNIST from $DATA, $STEPS steps, data on the GPUs"
    timeout "$(cap 70)" "${TORCHRUN[@]}" "${TRAIN[@]}" --dataset fashion-mnist --data-root "$DATA" --data-on-device \
        --output-dir "$OUT/train-fashion-mnist" --overwrite 2>&1 | tee "$OUT/train-fashion-mnist.log"
    log "Fashion-MNIST run done (exit ${PIPESTATUS[0]})"
fi

# 2. The pipeline against one device, with each rank's parameters and peak memory (CUDA max_memory_allocated).
log "2/3 bench pipeline --device $DEVICE --ranks $N: $ARCH K=$K, batch $BENCH_BATCH"
timeout "$(cap 100)" "$PYTHON" -m mlaan bench pipeline --device "$DEVICE" --ranks "$N" --arch "$ARCH" \
    --local-modules "$K" --batch-size "$BENCH_BATCH" --partition time "${TIMED[@]}" --output-dir "$OUT/pipeline" \
    2>&1 | tee "$OUT/pipeline.log"
log "bench pipeline done (exit ${PIPESTATUS[0]})"

# 3. Per-module times on one device at B, B/2, B/4, B/8 (the micro-batches of R replicas), for the cost model.
log "3/3 per-module times on $DEVICE at batch $TIMES_BATCH and its halves; --predict-from the pipeline run"
timeout "$(cap 40)" "$PYTHON" - "$DEVICE" "$ARCH" "$K" "$TIMES_BATCH" "$OUT/module_times.json" <<'EOF' 2>&1 | tee "$OUT/module_times.log"
import json, sys
import torch
from mlaan import create_local_model
from mlaan.distributed.pipeline import module_costs

device, arch, k, batch, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
model = create_local_model(arch, method="dgl+mlaan", num_local_modules=k).to(device)
times = {str(b): module_costs(model, "time", b) for b in (batch, batch // 2, batch // 4, batch // 8) if b >= 2}
json.dump({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "arch": arch, "k": k,
           "method": "dgl+mlaan", "seconds_per_module": times}, open(path, "w"), indent=1)
print({b: round(sum(t), 4) for b, t in times.items()}, "s per step (sum over modules) ->", path)
EOF
log "module times done (exit ${PIPESTATUS[0]})"
if [ -f "$OUT/pipeline/pipeline.json" ]; then
    timeout "$(cap 40)" "$PYTHON" -m mlaan bench pipeline --predict-from "$OUT/pipeline/pipeline.json" \
        --predict-repeats 1 --output-dir "$OUT/pipeline" 2>&1 | tee "$OUT/predict.log"
    log "prediction done (exit ${PIPESTATUS[0]}; its module times are re-measured on this host's CPU)"
fi

{
    echo "# bench/gpu_multi.sh on $CARD"
    echo
    echo "$(cat "$OUT/versions.txt"); $N ranks; $(elapsed) s in all"
    for run in train-synthetic train-fashion-mnist; do
        if [ -f "$OUT/$run/metrics.json" ]; then
            echo; echo "## $run"; echo
            "$PYTHON" -c "import json,sys; m=json.load(open(sys.argv[1])); print({k: m.get(k) for k in ('test_accuracy', 'test_loss', 'best_accuracy', 'steps', 'wall_time_seconds', 'peak_memory_bytes', 'peak_memory_kind', 'module_parallel')})" "$OUT/$run/metrics.json"
        fi
    done
    if [ -f "$OUT/pipeline.log" ]; then echo; echo "## bench pipeline"; echo; grep -E '^\||^peak|^parameters|^model' "$OUT/pipeline.log"; fi
} > "$OUT/SUMMARY.md"
log "wrote $OUT/SUMMARY.md"
