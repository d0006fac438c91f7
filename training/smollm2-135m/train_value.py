"""Train the state-value head V_k(h) (summed entropy of the next k steps from a hidden state) on the returns
label folders, for the lookahead-value F (calibrated_sampling.lookahead_value):

    python training/smollm2-135m/train_value.py --out runs/value-smollm2-135m

The folder's checkpoints make an interrupted run resume; OUT/head is the value folder, OUT/metrics.json its
held-out R^2 against the context-entropy-and-horizon baseline.
"""

import argparse
import json

from calibrated_sampling.models import load_model
from calibrated_sampling.value_train import train_value_head

LABELS = "training/smollm2-135m/labels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=f"{LABELS}/returns,{LABELS}/returns-round1")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    _, report = train_value_head(args.labels.split(","), model, tokenizer, args.out, epochs=args.epochs,
                                 seed=args.seed)
    print(json.dumps({name: {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
                      for name, scores in report["validation"].items()}, indent=1))
    print(f"{report['train_rows']} training rows, {report['value_parameters']} parameters, {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
