#!/bin/sh
# batch 256 (checkpointed BP and the copies at batch 256 are in ../../vit-recipe/vit-s16-b256-ckpt), ~5 min
exec sh "$(dirname "$0")/../measure_ckpt.sh" 256
