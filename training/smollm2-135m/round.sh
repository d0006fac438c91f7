#!/usr/bin/env bash
# One round of the paper's backward chain: F must be the future entropy under the *adjusted* model, so
# label returns with the previous round's calibrated sampler, retrain on all labels, refit, remeasure.
#   ROUND=1 training/smollm2-135m/round.sh   # previous head: heads/smollm2-135m (round 0)
#   ROUND=2 training/smollm2-135m/round.sh   # previous head: heads/smollm2-135m-round1
# Every step resumes where it stopped (label folders, train-head checkpoints); rerun after an interruption.
set -euo pipefail
R=${ROUND:-1}
LABELS=training/smollm2-135m/labels
if [ "$R" = 1 ]; then PREVIOUS=heads/smollm2-135m; else PREVIOUS=heads/smollm2-135m-round$((R - 1)); fi
HEAD=heads/smollm2-135m-round$R
# The same 40 fit-side prompts as returns/, another seed: q is now the calibrated sampler.
calibrated-sampling label --model smollm2-135m --data pydoc --split fit --kind returns \
    --sampler "calibrated:$PREVIOUS" --num-prompts 40 --max-new-tokens 256 --batch-size 8 --seed $((10 + R)) \
    --out "$LABELS/returns-round$R"
ROUNDS=$(for r in $(seq 1 "$R"); do printf ",%s" "$LABELS/returns-round$r"; done)
FOLDERS="$LABELS/returns,$LABELS/rollout,$LABELS/rollout-b,$LABELS/onestep$ROUNDS" FRACTIONS="" \
    OUT=runs/heads/smollm2-135m-round$R training/smollm2-135m/train.sh
python training/smollm2-135m/ship.py --runs runs/heads/smollm2-135m-round$R --dest "$HEAD"
HEAD=$HEAD OUT=results/calibrated-round$R training/smollm2-135m/calibrate.sh
