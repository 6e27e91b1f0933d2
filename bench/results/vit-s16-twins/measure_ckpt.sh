#!/bin/sh
# dgl+mlaan --lam-trunk twins --grad-checkpointing, K=4, ViT-S/16 at batch $1, exact accounting in its own process;
# prints the case as a RESULT line (what the folder's memory.json holds). Called by b64-ckpt/run.sh, b256-ckpt/run.sh.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 nice .venv/bin/python -c "
import json, sys, torch
torch.set_num_threads(1)
from mlaan.bench.memory import measure_case
case = measure_case(arch='timm:vit_small_patch16_224', batch=int(sys.argv[1]), mode='account', method='dgl+mlaan',
                    k=4, options={'lam_trunk': 'twins', 'grad_checkpointing': True})
print('RESULT ' + json.dumps(case), flush=True)
" "$1"
