#!/usr/bin/env bash
# Fit the shipped head's weights and measure the result on held-out text (the README's calibrated result).
# Fit: untied (a_t, b_t) per 32-step bin on the fit side of pydoc; measure: the eval side, never seen by
# labels, head or fit.
set -euo pipefail
HEAD=${HEAD:-heads/smollm2-135m}
calibrated-sampling fit --model smollm2-135m --head "$HEAD" --data pydoc --num-prompts ${FIT_PROMPTS:-24} \
    --heldout-prompts ${HELDOUT_PROMPTS:-16} --max-new-tokens 256 --bin-size 32 --form ${FORM:-untied}
calibrated-sampling measure --model smollm2-135m --data pydoc --split eval \
    --samplers "base,calibrated:$HEAD,${TEMPERATURE:-temperature=0.9}" \
    --num-prompts ${PROMPTS:-32} --max-new-tokens 256 --batch-size 16 --seed 0 --out ${OUT:-results/calibrated}
