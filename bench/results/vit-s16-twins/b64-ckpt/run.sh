#!/bin/sh
# dgl+mlaan --lam-trunk twins --grad-checkpointing, K=4, ViT-S/16, batch 64, exact accounting, in its own process
# (the case of memory.json; checkpointed BP at batch 64 is in ../../vit-recipe/vit-s16-b64-lam2), ~4 min
cd "$(dirname "$0")/../../../.."   # the repository root
OMP_NUM_THREADS=1 nice .venv/bin/python -c "
import json, torch
torch.set_num_threads(1)
from mlaan.bench.memory import measure_case
case = measure_case(arch='timm:vit_small_patch16_224', batch=64, mode='account', method='dgl+mlaan', k=4,
                    options={'lam_trunk': 'twins', 'grad_checkpointing': True})
print('RESULT ' + json.dumps(case), flush=True)
"
