#!/bin/sh
# Issue 33's target for the paper's trunk (ResNet-32 K=16 dgl+mlaan <= 35% of BP at <= 1.2x plain dgl+mlaan's
# step) with --checkpoint-trunk lead: recompute only each LAM trunk's lead (the copy and EMA twin at the module's
# resolution), everywhere (lead) or in the first 7 local modules (lead7), beside full recomputation and the
# selective points of checkpoint_modules alone (sel7, sel8), plain dgl+mlaan, bp and checkpointed bp: one
# interleaved run of 5 rounds, batch 256 accounted, 128 timed, one thread. Run it with nothing else on the machine.
cd "$(dirname "$0")/../../../.."   # the repository root
OMP_NUM_THREADS=1 exec .venv/bin/mlaan bench frontier --arch resnet32 --ks 16 --methods bp,dgl+mlaan \
    --segments 1 --batch 256 --time-batch 128 --repeats 5 --warmup 1 --threads 1 \
    --variant lead=checkpoint_trunk=lead --variant lead7=checkpoint_modules=7,checkpoint_trunk=lead \
    --variant sel7=checkpoint_modules=7 --variant sel8=checkpoint_modules=8 \
    --output-dir bench/results/frontier/resnet32-k16-lead-idle "$@"
# The committed frontier.md/json were measured at code cb0450b and their test errors annotated afterwards, from the
# same measurements, by the annotation rule of the next commit (a point that only recomputes shares its plain
# method's error; cb0450b annotated no --variant point).
