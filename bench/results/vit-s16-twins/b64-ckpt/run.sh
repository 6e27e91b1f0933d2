#!/bin/sh
# batch 64 (checkpointed BP at batch 64 is in ../../vit-recipe/vit-s16-b64-lam2), ~4 min
exec sh "$(dirname "$0")/../measure_ckpt.sh" 64
