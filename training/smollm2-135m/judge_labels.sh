#!/usr/bin/env bash
# The judge (issue 15): low-noise within-context truth on the EVAL side of pydoc and of Jane Austen, to
# score any F against. 12 held-out prompts x 4 prefixes = 48 contexts per text; at each, the human
# token and q's top 8 candidates get 8 continuations each, driven by common random numbers (every
# candidate of a context sees the same noise), at horizons 16 and 64. The same seed puts both horizons
# at the same contexts. Nothing is trained on these folders. Each run resumes where it stopped.
# About 40 min on 2 CPU cores (horizon 64: 80 s per prompt).
set -euo pipefail
OUT=${OUT:-training/smollm2-135m/labels}
AUSTEN=${AUSTEN:-../shared/data/austen}
for H in 16 64; do
    for TEXT in pydoc austen; do
        DATA=pydoc; [ "$TEXT" = austen ] && DATA="$AUSTEN"
        calibrated-sampling label --model smollm2-135m --data "$DATA" --split eval --kind rollout \
            --num-prompts ${PROMPTS:-12} --max-new-tokens 256 --candidates 8 --rollouts 8 --positions 4 \
            --horizon $H --batch-size 1 --seed 0 --out "$OUT/judge-$TEXT-h$H"
    done
done
