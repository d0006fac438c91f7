#!/usr/bin/env bash
# Entropy-matched schedules (`fit --objective entropy`, the default): every 64-step bin's generation entropy
# matched to its human log loss on the fit side, then judged on the eval side, which no fit saw.
# Two F's: none (a per-step temperature schedule) and the shipped head's. Defaults: Jane Austen, 512 tokens
# (text the head never saw; ../shared/data/austen holds the six novels as plain text, e.g. from Project
# Gutenberg), 48 fit prompts, 128 held-out prompts:
#   training/smollm2-135m/entropy_schedules.sh
# The results of docs/results.md:
#   FITS=head PROMPTS=64 BASE= OUT=results/schedules-austen-512 training/smollm2-135m/entropy_schedules.sh
#     (then the same with FITS="head temperature": the journal resumes, only the new schedule is measured)
#   DATA=pydoc T=256 NAME=pydoc-256 FIT_PROMPTS=32 ROUNDS=16 PROMPTS=64 OUT=results/schedules-pydoc-256 \
#     TEMPERATURE=temperature=0.9,temperature=0.91,min_p=0.0005628,min_p=0.0006973 training/smollm2-135m/entropy_schedules.sh
#   (the exact one-step lookahead at EntCE 0: alpha from results/lookahead-fit/pydoc-onestep.json, its temperature
#    bracketing EntCE 0; the journal measures only the new samplers:
#    ... TEMPERATURE=temperature=0.9,temperature=0.91,min_p=0.0005628,min_p=0.0006973,\
#    lookahead:alpha=0.1005:top=16:temperature=0.92,lookahead:alpha=0.1005:top=16:temperature=0.93 ...)
#   (the exact two-step F at EntCE 0 on pydoc 128: alpha from results/lookahead-fit/pydoc-two-step.json, added to
#    the pydoc-128 run (docs/results.md, *The lookahead's entropy-matched schedule*): ... TEMPERATURE=...,lookahead2:alpha=0.1069:top=8:top2=8:temperature=0.92,\
#    lookahead2:alpha=0.1069:top=8:top2=8:temperature=0.94; then twice the one-step weight, the same way:
#    ...,lookahead:alpha=0.2:top=16:temperature=0.93,...:temperature=0.95,...:temperature=0.97; and the learned state
#    value, alpha from results/lookahead-fit/pydoc-value-h16.json: ...,lookahead-value:heads/smollm2-135m-value:\
#    alpha=0.02116:top=16:horizon=16:temperature=0.92,...:temperature=0.9)
#   (the one-step lookahead at EntCE 0 on Austen, 32 held-out prompts x 512, pydoc's alpha: a measure run alone:
#    calibrated-sampling measure --model smollm2-135m --data ../shared/data/austen --split eval --samplers \
#      temperature=0.96,temperature=0.97,lookahead:alpha=0.1005:top=16:temperature=0.98,\
#      lookahead:alpha=0.1005:top=16:temperature=0.97,lookahead:alpha=0.2:top=16:temperature=1.0,\
#      lookahead:alpha=0.2:top=16:temperature=1.02,lookahead-value:heads/smollm2-135m-value:alpha=0.02116:top=16:\
#      horizon=16:temperature=0.97,...:temperature=0.98 --num-prompts 32 --max-new-tokens 512 --batch-size 16 \
#      --seed 0 --out results/lookahead-austen-512)
#   MODEL=gemma3-270m DATA=pydoc T=128 NAME=pydoc-128 FIT_PROMPTS=24 PROMPTS=32 FITS=temperature \
#     OUT=results/schedules-gemma3-270m-pydoc-128 \
#     TEMPERATURE=temperature=0.96,min_p=0.000002,min_p=0.00001,min_p=0.00005,min_p=0.0002 \
#     training/smollm2-135m/entropy_schedules.sh   (another model: no head of its own, so F = none only)
#   (then the one-step lookahead on Gemma with SmolLM2's pydoc alpha, a measure run on the same journal:
#    calibrated-sampling measure --model gemma3-270m --data pydoc --split eval --samplers base,schedule:\
#      schedules/gemma3-270m-pydoc-128-temperature.json,temperature=0.96,min_p=0.000002,min_p=0.00001,min_p=0.00005,\
#      min_p=0.0002,lookahead:alpha=0.1005:top=16,lookahead:alpha=0.1005:top=16:temperature=0.98 --num-prompts 32 \
#      --max-new-tokens 128 --batch-size 16 --seed 0 --out results/schedules-gemma3-270m-pydoc-128)
#   (the one-step lookahead on a third text, Python code, pydoc's alpha, a measure run alone:
#    calibrated-sampling measure --model smollm2-135m --data stdlib-code --split eval --samplers base,temperature=0.9,\
#      temperature=0.95,lookahead:alpha=0.1005:top=16:temperature=0.92,lookahead:alpha=0.1005:top=16:temperature=0.945 \
#      --num-prompts 32 --max-new-tokens 256 --batch-size 16 --seed 0 --out results/lookahead-stdlib-code-256)
#   (the distilled one-step head's F at the one-step lookahead's weight, read at EntCE 0 with its own temperature:
#    calibrated:heads/smollm2-135m-distilled:alpha=0.1005:temperature=T added to the pydoc-128 run (T 0.91, 0.93;
#    alpha=0.3 at 0.91, 0.93), to the pydoc-256 run (T 0.9, 0.91) and to the Austen measure run above (T 0.96, 0.97,
#    0.98))
#   (the lookahead's schedule with F's weight fixed, added to the pydoc-256 and pydoc-128 runs: FITS="temperature
#    head lookahead-alpha" TOP=16 F_WEIGHT=0.1005 and the same TEMPERATURE list as before (pydoc-128: FITS=
#    "temperature lookahead-alpha", its TEMPERATURE list ending in schedule:schedules/smollm2-135m-pydoc-128-lookahead.json);
#    then with one bin on pydoc 128, from a = 1, and measured the same way:
#    calibrated-sampling fit --model smollm2-135m --data pydoc --num-prompts 24 --max-new-tokens 128 --bin-size 128 \
#      --batch-size 16 --max-rounds 6 --lookahead-top 16 --f-weight 0.1005 \
#      --out schedules/smollm2-135m-pydoc-128-lookahead-alpha-one-bin.json)
#   (the lookahead's fixed-weight schedule on Austen, 48 fit prompts x 512 as the others there: a pass and rounds of
#    70-90 min each on 2 cores, run over three sessions (the same command resumes at the batch it stopped in);
#    it converged in 3 rounds:
#    FITS=lookahead-alpha F_WEIGHT=0.1005 ... the fit line alone:
#    calibrated-sampling fit --model smollm2-135m --data ../shared/data/austen --num-prompts 48 --max-new-tokens 512 \
#      --bin-size 64 --batch-size 16 --max-rounds 8 --lookahead-top 16 --f-weight 0.1005 \
#      --start schedules/smollm2-135m-austen-512-temperature.json --out schedules/smollm2-135m-austen-512-lookahead-alpha.json
#    then measured in the 32-prompt Austen journal beside the one-knob lookahead: the measure command of
#    results/lookahead-austen-512 above with ,schedule:schedules/smollm2-135m-austen-512-lookahead-alpha.json added)
# FITS: which schedules (temperature, head, lookahead: F from the one-step lookahead over the top TOP = 8;
# lookahead-alpha: the same F with its weight held at F_WEIGHT in every bin and only the a_j matched, the rounds
# starting from START, by default the temperature schedule's a_j, so list temperature first);
# TEMPERATURE: the samplers measured beside them, two of them on
# either side of EntCE 0 so that `measure` reads the schedules against temperature at EntCE 0; BASE= leaves
# the base sampler out. Each fit keeps its rounds beside its output (*.rounds.json) and each measurement its
# journal entry, so an interrupted run picks up where it stopped.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
DATA=${DATA:-../shared/data/austen}
T=${T:-512}
NAME=${NAME:-austen-512}
HEAD=${HEAD:-heads/smollm2-135m}
FITS=${FITS:-temperature head}
FIT="--model $MODEL --data $DATA --num-prompts ${FIT_PROMPTS:-48} --max-new-tokens $T --bin-size 64 \
     --batch-size 16 --max-rounds ${ROUNDS:-8}"
SAMPLERS=${BASE-base,}
for kind in $FITS; do
  schedule=schedules/$MODEL-$NAME-$kind.json
  case $kind in
    temperature) [ -f "$schedule" ] || calibrated-sampling fit $FIT --out "$schedule" ;;
    head) [ -f "$schedule" ] || calibrated-sampling fit $FIT --head "$HEAD" --out "$schedule" ;;
    lookahead) [ -f "$schedule" ] || calibrated-sampling fit $FIT --lookahead-top "${TOP:-8}" --out "$schedule" ;;
    lookahead-alpha) [ -f "$schedule" ] || calibrated-sampling fit $FIT --lookahead-top "${TOP:-16}" \
        --f-weight "${F_WEIGHT:?FITS=lookahead-alpha needs F_WEIGHT, e.g. the alpha of lookahead-fit}" \
        --start "${START:-schedules/$MODEL-$NAME-temperature.json}" --out "$schedule" ;;
    *) echo "FITS: unknown schedule kind '$kind' (temperature, head, lookahead, lookahead-alpha)" >&2; exit 2 ;;
  esac
  SAMPLERS="${SAMPLERS}schedule:$schedule,"
done
calibrated-sampling measure --model $MODEL --data "$DATA" --split eval \
    --samplers "${SAMPLERS}${TEMPERATURE:-temperature=0.97,temperature=0.96}" \
    --num-prompts ${PROMPTS:-128} --max-new-tokens $T --batch-size 16 --seed 0 --out ${OUT:-results/calibrated-austen-512}
