#!/usr/bin/env bash
# The distilled one-step head: the tied head trained on the exact one-step labels alone (`onestep`:
# F_1(x, v) = H(p(. | x, v)) for the human token and the top 32 others, no sampling noise), read at
# horizon 1 at every step (`--fixed-horizon 1`), so that it serves the lookahead's F at the head's cost.
# The run resumes from its checkpoints; the result is copied to heads/smollm2-135m-distilled.
set -euo pipefail
LABELS=${LABELS:-training/smollm2-135m/labels}
OUT=${OUT:-runs/heads/smollm2-135m-distilled}
DEST=${DEST:-heads/smollm2-135m-distilled}
calibrated-sampling train-head --model smollm2-135m --labels "$LABELS/onestep" --fixed-horizon 1 --family tied \
    --mlp-hidden 1024 --epochs ${EPOCHS:-8} --batch-size 256 --lr 1e-3 --val-fraction 0.2 --seed 0 --out "$OUT"
mkdir -p "$DEST"
cp "$OUT"/head/config.json "$OUT"/head/head.safetensors "$OUT"/metrics.json "$OUT"/loss.png "$DEST"/
python - "$DEST" <<'PY'
import json, sys
from pathlib import Path
from calibrated_sampling.heads import write_card
dest = Path(sys.argv[1])
m = json.loads((dest / "metrics.json").read_text())
v = m["validation"]["onestep"]
shipped = json.loads(Path("heads/smollm2-135m/metrics.json").read_text())["full"]["validation"]["onestep"]["corr_within"]
write_card(dest, f"""# smollm2-135m distilled one-step head

The tied head of `heads/smollm2-135m` (same shape, {m['head_parameters']:,} parameters), trained on the exact
one-step labels alone (`training/smollm2-135m/labels/onestep`: 96 fit-side pydoc prompts x 16 human prefixes,
the human token and the top 32 others, target H(p(. | x, v)) exactly) and read at horizon 1 at every step
(`fixed_horizon: 1`): the one-step lookahead's F without the lookahead's extra pass.

Held out (20% of the prompts, {v['contexts_within']} contexts, {v['rows']:,} rows): R^2 {v['r2']:.3f}, within-context
R^2 {v['r2_within']:.3f} and correlation {v['corr_within']:+.3f} (a perfect copy of the lookahead scores 1; the
shipped head, trained on all label kinds, scores {shipped:+.3f}). {m['train_rows']:,} training rows, {m['seconds'] / 60:.1f} min
on {m['machine']}. Recipe: `training/smollm2-135m/distill.sh`.
""")
PY
echo "shipped $DEST"
