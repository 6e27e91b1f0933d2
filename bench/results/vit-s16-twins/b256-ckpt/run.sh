#!/bin/sh
# dgl+mlaan --lam-trunk twins --grad-checkpointing, K=4, ViT-S/16, batch 256, exact accounting, in its own process
# (checkpointed BP and the copies at batch 256 are in ../../vit-recipe/vit-s16-b256-ckpt), ~15 min on one thread
cd "$(dirname "$0")/../../../.."   # the repository root
OMP_NUM_THREADS=1 nice .venv/bin/python -c "
import json, torch
torch.set_num_threads(1)
from mlaan.bench.memory import measure_case
case = measure_case(arch='timm:vit_small_patch16_224', batch=256, mode='account', method='dgl+mlaan', k=4,
                    options={'lam_trunk': 'twins', 'grad_checkpointing': True})
print('RESULT ' + json.dumps(case), flush=True)
"
