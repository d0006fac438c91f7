#!/usr/bin/env bash
# Labels for the shipped smollm2-135m head: pydoc text, fit side of the split only (the eval side is
# what measure / fit judge the head on). Every run resumes where it stopped; rerun after an interruption.
# The shards (token ids and targets, a few MB) are committed; the hidden-state caches beside them are
# not, and train-head rebuilds them from the ids in a fresh clone.
set -euo pipefail
OUT=${OUT:-training/smollm2-135m/labels}
T=256
# Returns labels: every step of a sampled continuation, target = entropies to the end of the generation.
calibrated-sampling label --model smollm2-135m --data pydoc --split fit --kind returns \
    --num-prompts ${RETURNS_PROMPTS:-40} --max-new-tokens $T --batch-size 8 --seed 0 --out "$OUT/returns"
# Rollout labels with common random numbers: the candidates of one context, for within-context skill.
calibrated-sampling label --model smollm2-135m --data pydoc --split fit --kind rollout \
    --num-prompts ${ROLLOUT_PROMPTS:-24} --max-new-tokens $T --candidates 8 --rollouts 2 --positions 4 \
    --horizon 16 --batch-size 2 --seed 0 --out "$OUT/rollout"
# One-step labels: horizon 1 with one rollout is F_1(x, v) = H(p(. | x, v)) exactly, with no sampling noise,
# for the human token and the top 32 others at 16 prefixes per prompt: a cheap, noiseless within-context
# signal (the candidate's effect on the future is largest right after it).
calibrated-sampling label --model smollm2-135m --data pydoc --split fit --kind rollout \
    --num-prompts ${ONESTEP_PROMPTS:-96} --max-new-tokens $T --candidates 32 --rollouts 1 --positions 16 \
    --horizon 1 --batch-size 8 --seed 2 --out "$OUT/onestep"
# More rollout contexts (another seed: other human positions j, also in the first 24 prompts). Window i is
# the same prompt in every folder, and train-head holds out whole prompts across folders.
calibrated-sampling label --model smollm2-135m --data pydoc --split fit --kind rollout \
    --num-prompts ${ROLLOUT_PROMPTS_B:-96} --max-new-tokens $T --candidates 8 --rollouts 2 --positions 4 \
    --horizon 16 --batch-size 2 --seed 1 --out "$OUT/rollout-b"
