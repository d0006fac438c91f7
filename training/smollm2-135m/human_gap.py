"""Do human tokens lead to less future entropy than the model's own choices, and does the head see it?

    python training/smollm2-135m/human_gap.py [--head heads/smollm2-135m] [--out results/human-gap.json]

The fitted F-weight b_t can move off zero only if F at the human token differs from F's average under
the model: d(human log loss)/db at b = 0 is the gap F(x, v_human) - E_{v~p}[F(x, v)], averaged over
contexts. The rollout label folders hold, for each context, the human token and the model's top
candidates with their measured future entropy (16-step rollouts; one step exactly in `onestep`). On the
prompts held out from training (the same split as train-head), this prints that gap as measured and as
the head predicts it (a head of one fixed horizon is read at it), with p renormalised over each context's candidates.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from calibrated_sampling.heads import FutureEntropyHead
from calibrated_sampling.judge import candidate_log_probs, human_gaps
from calibrated_sampling.label_rows import window_share  # train-head's split of prompts
from calibrated_sampling.label_store import load_labels, read_manifest
from calibrated_sampling.models import load_model

FOLDERS = ("onestep", "rollout", "rollout-b")


def summary(x: torch.Tensor) -> dict:
    return {"mean": x.mean().item(), "stderr": (x.std() / math.sqrt(len(x))).item(), "contexts": len(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default="heads/smollm2-135m")
    parser.add_argument("--labels", default="training/smollm2-135m/labels")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    head = FutureEntropyHead.from_pretrained(args.head, model=model, tokenizer=tokenizer).eval()
    report = {}
    print(f"{'folder':10s} {'horizon':>7s} {'contexts':>8s} {'p covered':>9s} {'gap measured':>16s} "
          f"{'gap predicted':>16s} {'corr':>6s}")
    for name in FOLDERS:
        folder = Path(args.labels) / name
        labels = load_labels(folder, model=model, progress=False)
        held_out = window_share(labels["context_id"] // read_manifest(folder)["settings"]["max_new_tokens"], 0.2)
        rows = {key: labels[key][held_out] for key in ("hidden", "token", "horizon", "target", "context_id", "human")}
        with torch.no_grad():
            log_p = candidate_log_probs(model, rows["hidden"], rows["token"])
            predicted = head.predict_rows(rows["hidden"], rows["token"], head.horizon_for(rows["horizon"])).double()
        _, group = torch.unique(rows["context_id"], return_inverse=True)
        human_rows = rows["human"].bool()
        measured = human_gaps(group, human_rows, rows["target"].double(), log_p)
        guessed = human_gaps(group, human_rows, predicted, log_p)
        covered = torch.zeros(int(group.max()) + 1, dtype=log_p.dtype).index_add_(0, group, log_p.exp()).mean().item()
        corr = torch.corrcoef(torch.stack([measured, guessed]))[0, 1].item()
        report[name] = {"horizon": int(rows["horizon"].max()), "p_covered": covered, "measured": summary(measured),
                        "predicted": summary(guessed), "corr": corr}
        m, g = report[name]["measured"], report[name]["predicted"]
        print(f"{name:10s} {report[name]['horizon']:7d} {m['contexts']:8d} {covered:9.2f} "
              f"{m['mean']:+8.3f} ± {m['stderr']:.3f} {g['mean']:+8.3f} ± {g['stderr']:.3f} {corr:+6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"head": args.head, "folders": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
