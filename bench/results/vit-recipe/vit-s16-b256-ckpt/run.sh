#!/bin/sh
# bp +ckpt and dgl+mlaan (lam_depth 2) +ckpt, K=4, ViT-S/16, batch 256, each in its own process (bench memory
# would also run plain bp, ~15 GiB at this batch: more than this shared machine has free)
cd /work/main
for case in '{"method": "bp", "k": 1, "options": {"grad_checkpointing": true}}' \
            '{"method": "dgl+mlaan", "k": 4, "options": {"grad_checkpointing": true, "lam_depth": 2}}' \
            '{"method": "dgl+mlaan", "k": 4, "options": {"grad_checkpointing": true, "lam_depth": 1}}'; do
  OMP_NUM_THREADS=1 nice .venv/bin/python -c "
import json, sys, torch
torch.set_num_threads(1)
from mlaan.bench.memory import measure_case
case = json.loads(sys.argv[1])
print('RESULT ' + json.dumps(measure_case(arch='timm:vit_small_patch16_224', batch=256, mode='account', **case)), flush=True)
" "$case"
done
