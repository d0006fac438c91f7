#!/usr/bin/env bash
# Fit the shipped head's weights and measure the result on held-out text (docs/results.md, *Calibrated sampling on held-out text*).
# Fit: untied (a_t, b_t) per 32-step bin on the fit side of pydoc; measure: the eval side, never seen by
# labels, head or fit. The fit is the log-loss one (`--objective log-loss`; the entropy-matched schedules have
# their own recipe, entropy_schedules.sh). T is the generation length the schedule covers; FIT_OUT writes the
# weights to a schedule file beside the head instead of into its config.json (the 512-token schedule lives
# beside the shipped 256-token one):
#   T=512 FIT_OUT=schedules/smollm2-135m-pydoc-512-logloss.json PROMPTS=47 OUT=results/calibrated-512 \
#     training/smollm2-135m/calibrate.sh
# DATA: the text of the fit and the measurement (each on its own side of the split; default pydoc); with
# Jane Austen, text the head never saw at all (it was trained on pydoc):
#   DATA=../shared/data/austen T=512 FIT_OUT=schedules/smollm2-135m-austen-512-logloss.json PROMPTS=128 \
#     TEMPERATURE=temperature=0.97,temperature=0.96,temperature=1.04 OUT=results/calibrated-austen-512 \
#     training/smollm2-135m/calibrate.sh
# measure keeps a journal in OUT: a rerun after an interruption measures only what it had not finished.
set -euo pipefail
HEAD=${HEAD:-heads/smollm2-135m}
DATA=${DATA:-pydoc}
T=${T:-256}
CALIBRATED=${FIT_OUT:+schedule:$FIT_OUT}  # the fitted weights: a schedule file, or the head's own config
CALIBRATED=${CALIBRATED:-calibrated:$HEAD}
calibrated-sampling fit --objective log-loss --model smollm2-135m --head "$HEAD" ${FIT_OUT:+--out "$FIT_OUT"} --data "$DATA" \
    --num-prompts ${FIT_PROMPTS:-24} --heldout-prompts ${HELDOUT_PROMPTS:-16} --max-new-tokens $T --bin-size 32 \
    --form ${FORM:-untied}
calibrated-sampling measure --model smollm2-135m --data "$DATA" --split eval \
    --samplers "base,$CALIBRATED,${TEMPERATURE:-temperature=0.9}" \
    --num-prompts ${PROMPTS:-32} --max-new-tokens $T --batch-size 16 --seed 0 --out ${OUT:-results/calibrated}
