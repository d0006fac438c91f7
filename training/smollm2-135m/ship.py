"""Copy the fully trained head into heads/smollm2-135m and write its card from the training metrics.

    python training/smollm2-135m/ship.py [--runs runs/heads/smollm2-135m] [--dest heads/smollm2-135m]

The card's figures are read from the metrics.json that `calibrated-sampling train-head` wrote for each
run of train.sh (the learning curve: the same recipe on a share of the training windows).
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from calibrated_sampling.heads import CONFIG_NAME, WEIGHTS_NAME, write_card
from calibrated_sampling.label_store import load_labels, read_manifest

WITHIN = ("onestep", "rollout", "rollout-b")  # the folders whose contexts have several candidates


def row(name: str, metrics: dict) -> str:
    validation = metrics["validation"]
    returns = validation["returns"]
    within = [f"{validation[f]['r2_within']:+.3f} / {validation[f]['corr_within']:+.3f} ({validation[f]['contexts_within']})"
              for f in WITHIN]
    return (f"| {name} | {metrics['train_rows']:,} | {returns['r2']:.3f} | {returns['baseline_r2']:.3f} | "
            + " | ".join(within) + f" | {metrics['seconds'] / 60:.1f} |")


def labelled_windows(folder: Path) -> int:
    """Prompts actually labelled in a (possibly unfinished) label folder."""
    return sum(end - start for start, end in (e["windows"] for e in read_manifest(folder)["shards"]))


def rollout_agreement(folders: list[Path]) -> float:
    """Within-context correlation between the first two rollouts of each candidate: the reliability of
    one rollout target, which caps the within-context R^2 any head can reach on them."""
    first, second = [], []
    for folder in folders:
        rows = load_labels(folder, hidden=False)
        _, group = torch.unique(rows["context_id"], return_inverse=True)
        counts = torch.bincount(group).double()
        for column, out in ((0, first), (1, second)):
            x = rows["rollout_returns"][:, column].double()
            out.append(x - torch.zeros(len(counts), dtype=x.dtype).index_add_(0, group, x)[group] / counts[group])
    return torch.corrcoef(torch.stack([torch.cat(first), torch.cat(second)]))[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/heads/smollm2-135m")
    parser.add_argument("--dest", default="heads/smollm2-135m")
    parser.add_argument("--labels", default="training/smollm2-135m/labels")
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
    returns, rollout, onestep = labels["returns"], labels["rollout"], labels["onestep"]
    done = {name: labelled_windows(Path(args.labels) / name) for name in labels}
    rounds = sorted(name for name in labels if name.startswith("returns-round"))
    agreement = rollout_agreement([Path(args.labels) / "rollout", Path(args.labels) / "rollout-b"])
    lines = [
        "# smollm2-135m future-entropy head",
        "",
        f"Tied head (f = k (s + U_v . z / sqrt(d) + c_v), U the LM's own output embedding): "
        f"{full['head_parameters']:,} parameters, {full['head_parameters'] / full['lm_parameters']:.1%} of the LM's "
        f"{full['lm_parameters']:,}. Predicts, for every next token, the summed entropy of the rest of a "
        f"{returns['max_new_tokens']}-token generation of the base model.",
        "",
        "Data: pydoc (`pydoc_data.topics`), `fit` side of the document-hash split only; everything this "
        "head is judged on in docs/results.md uses the `eval` side.",
        f"- returns labels: {returns['windows']} prompts, {returns['max_new_tokens']} sampled tokens each, every "
        f"step a row, target = entropies to the end of the generation; trained on TD(lambda = "
        f"{label_record['td_lambda']}) targets bootstrapped after n = {label_record['td_n']} steps from the "
        "context-entropy baseline, judged against the Monte Carlo returns.",
        f"- rollout labels (`rollout`, `rollout-b`: seeds 0 and 1, other prefixes): {done['rollout']} + "
        f"{done['rollout-b']} prompts x {rollout['positions']} human prefixes, the human token and the top "
        f"{rollout['candidates']} others, {rollout['rollouts']} rollouts of {rollout['horizon']} steps each with "
        "common random numbers.",
        f"- one-step labels (`onestep`): {done['onestep']} prompts x {onestep['positions']} human prefixes, the human "
        f"token and the top {onestep['candidates']} others; horizon 1 with one rollout is F_1(x, v) = H(p(. | x, v)) "
        "exactly, a noiseless within-context target.",
        *[f"- round {name.removeprefix('returns-round')} returns labels (`{name}`): the same {labels[name]['windows']} "
          f"prompts, seed {labels[name]['seed']}, sampled from the previous round's calibrated sampler "
          f"(`{labels[name]['q']}`), so that F is the future entropy under the adjusted model." for name in rounds],
        "- labelled prompts out of those the recipe asks for: " + ", ".join(
            f"{name} {done[name]} of {labels[name]['windows']}" for name in labels)
        + ("." if all(done[name] == labels[name]["windows"] for name in labels)
           else " (the rest was not labelled yet; `labels.sh` resumes it)."),
        "- validation: 20% of the prompts of each folder, held out whole (never a row of a training prompt).",
        "",
        "Held-out R^2 on the Monte Carlo returns (baseline: least squares on the context's entropy and the "
        "remaining horizon, no token), and within-context R^2 / correlation (rows demeaned per context: how well "
        "the candidates of one context are told apart; any predictor constant within a context scores 0; held-out "
        "contexts in brackets). The correlation is free of scale: the fitted weights b_t, one per step bin and so "
        "one per horizon range, rescale the head's candidate differences, and a head whose differences point the "
        "right way but are too large at some horizon has R^2 < 0 and a positive correlation. onestep targets "
        "are exact; a 16-step rollout target is the mean of 2 rollouts, whose "
        "within-context reliability caps the attainable R^2 (one rollout agrees with the other at "
        f"within-context correlation {agreement:.2f}, so the mean of two at {2 * agreement / (1 + agreement):.2f}, "
        f"and no head can correlate with it above about {math.sqrt(2 * agreement / (1 + agreement)):.2f}).",
        "",
        "| training share | rows | returns R^2 | baseline | within R^2 / corr: onestep | rollout | rollout-b "
        "| minutes |",
        "|---|---|---|---|---|---|---|---|",
        *[row(f"{share:.0%}", metrics) for share, metrics in curve],
        row("100%", full),
        "",
        f"Machine: {full['machine']}; minutes = training time of that run. Recipe: `training/smollm2-135m/`.",
    ]
    write_card(dest, "\n".join(lines))
    print((dest / "card.md").read_text())


if __name__ == "__main__":
    main()
