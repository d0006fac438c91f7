"""Copy the fully trained head into heads/smollm2-135m and write its card from the training metrics.

    python training/smollm2-135m/ship.py [--runs runs/heads/smollm2-135m] [--dest heads/smollm2-135m]

The card's figures are read from the metrics.json that `calibrated-sampling train-head` wrote for each
run of train.sh (the learning curve: the same recipe on a share of the training windows).
"""

import argparse
import json
import shutil
from pathlib import Path

from calibrated_sampling.heads import CONFIG_NAME, WEIGHTS_NAME, write_card


def row(name: str, metrics: dict) -> str:
    validation = metrics["validation"]
    rollout, returns = validation.get("rollout (all)", validation["rollout"]), validation["returns"]
    return (f"| {name} | {metrics['train_rows']:,} | {returns['r2']:.3f} | {returns['baseline_r2']:.3f} | "
            f"{rollout['r2']:.3f} | {rollout['baseline_r2']:.3f} | {rollout['r2_within']:+.3f} | "
            f"{rollout['contexts_within']} | {metrics['seconds'] / 60:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/heads/smollm2-135m")
    parser.add_argument("--dest", default="heads/smollm2-135m")
    args = parser.parse_args()
    runs, dest = Path(args.runs), Path(args.dest)
    full = json.loads((runs / "full" / "metrics.json").read_text())
    curve = sorted((float(p.name.split("-", 1)[1]), json.loads((p / "metrics.json").read_text()))
                   for p in runs.glob("fraction-*") if (p / "metrics.json").is_file())
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(runs / "full" / "head" / name, dest / name)
    shutil.copy2(runs / "full" / "loss.png", dest / "loss.png")
    (dest / "metrics.json").write_text(json.dumps({"full": full, "learning_curve": dict(curve)}, indent=2) + "\n")
    label_record = json.loads((runs / "full" / "head" / CONFIG_NAME).read_text())["label_settings"]
    labels = {s["folder"]: s for s in full["label_settings"]}
    returns = labels["returns"]
    rollouts = [s for s in full["label_settings"] if s["kind"] == "rollout"]
    rollout = rollouts[0]
    lines = [
        "# smollm2-135m future-entropy head",
        "",
        f"Tied head (f = k (s + U_v . z / sqrt(d) + c_v), U the LM's own output embedding): "
        f"{full['head_parameters']:,} parameters, {full['head_parameters'] / full['lm_parameters']:.1%} of the LM's "
        f"{full['lm_parameters']:,}. Predicts, for every next token, the summed entropy of the rest of a "
        f"{returns['max_new_tokens']}-token generation of the base model.",
        "",
        "Data: pydoc (`pydoc_data.topics`), `fit` side of the document-hash split only; everything this "
        "head is judged on in the README uses the `eval` side.",
        f"- returns labels: {returns['windows']} prompts, {returns['max_new_tokens']} sampled tokens each, every "
        f"step a row, target = entropies to the end of the generation; trained on TD(lambda = "
        f"{label_record['td_lambda']}) targets bootstrapped after n = {label_record['td_n']} steps from the "
        "context-entropy baseline, judged against the Monte Carlo returns.",
        f"- rollout labels: {' + '.join(str(s['windows']) for s in rollouts)} prompts (seeds "
        f"{', '.join(str(s['seed']) for s in rollouts)}) x {rollout['positions']} human prefixes, the human token "
        f"and the top {rollout['candidates']} others, {rollout['rollouts']} rollouts of {rollout['horizon']} steps "
        "each with common random numbers.",
        "- validation: 20% of the prompts of each folder, held out whole (never a row of a training prompt).",
        "",
        "Held-out R^2 (baseline = least squares on the context's entropy and the remaining horizon, no token; "
        "within = rows demeaned per context, i.e. how well the candidates of one context are ranked):",
        "",
        "| training share | rows | returns R^2 | baseline | rollout R^2 | baseline | rollout R^2 within | contexts "
        "| minutes |",
        "|---|---|---|---|---|---|---|---|---|",
        *[row(f"{share:.0%}", metrics) for share, metrics in curve],
        row("100%", full),
        "",
        f"Machine: {full['machine']}; minutes = training time of that run. Recipe: `training/smollm2-135m/`.",
    ]
    write_card(dest, "\n".join(lines))
    print((dest / "card.md").read_text())


if __name__ == "__main__":
    main()
