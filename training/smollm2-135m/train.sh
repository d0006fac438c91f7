#!/usr/bin/env bash
# Train the shipped smollm2-135m head on the labels of labels.sh, with a learning curve over the label
# count (the within-context R^2 on held-out rollout contexts is the number that decides calibration).
# Every train-head run resumes from its checkpoints; rerun after an interruption.
set -euo pipefail
LABELS=${LABELS:-training/smollm2-135m/labels}
OUT=${OUT:-runs/heads/smollm2-135m}
FOLDERS=${FOLDERS:-$LABELS/returns,$LABELS/rollout,$LABELS/rollout-b,$LABELS/onestep}
COMMON=(--model smollm2-135m --labels "$FOLDERS" --family tied --mlp-hidden 1024
        --epochs ${EPOCHS:-4} --batch-size 256 --lr 1e-3 --val-fraction 0.2 --td-n ${TD_N:-16} --td-lambda 0.9 --seed 0)
for fraction in ${FRACTIONS-0.25 0.5}; do  # the learning curve (FRACTIONS="" skips it)
    calibrated-sampling train-head "${COMMON[@]}" --train-fraction "$fraction" --out "$OUT/fraction-$fraction"
done
calibrated-sampling train-head "${COMMON[@]}" --out "$OUT/full"
