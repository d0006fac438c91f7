"""The league table of future-entropy sources F: how well each tells a context's candidates apart, how much
of the human-vs-model gap it sees, what human log loss makes of it, and what it costs per token.

    python training/smollm2-135m/league.py [--out results/league/league.md]

Every figure is read from a committed result that a command in the README wrote (nothing is measured here):

- within-context correlation with the exact one-step F on the 272 held-out `onestep` contexts (train-head's
  validation split; `metrics.json` of each head; the exact one-step lookahead is that judge, so 1 by definition);
- the human gap at horizon 1, F(x, v_human) - E_p F(x, v), predicted against measured (human_gap.py; the
  first derivative of the human log loss in F's weight at 0, so an F that predicts none of it gets no weight);
- the log-loss-fitted weight alpha of F over the top 16 candidates, with its window-clustered standard error, and
  the eval-side log-loss change at that alpha (`calibrated-sampling lookahead-fit`, 24 fit / 24 eval windows x
  256 tokens; results/lookahead-fit/{text}-{name}.json), on pydoc and Jane Austen;
- tokens per second against plain sampling at batch 1 and 16 (benchmarks/future_cost.py --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# name, the F's lookahead-fit file stem, its head folder (within-context and gap columns; "judge": the exact
# one-step F itself), its cost spec prefix
ROWS = (
    ("shipped head (all label kinds)", "head-shipped", "heads/smollm2-135m", "calibrated:heads/smollm2-135m"),
    ("distilled one-step head*", "head-distilled", "heads/smollm2-135m-distilled", "calibrated:heads/smollm2-135m"),
    ("exact one-step lookahead, top 16", "onestep", "judge", "lookahead:alpha=0.1:top=16"),
    ("lookahead-value (V_15 head), top 16", "value-h16", None, "lookahead-value:"),
    ("exact two-step, top 8 x 8", "two-step", None, "lookahead2:"),
)
TEXTS = ("pydoc", "austen")


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fit_cells(result: dict | None) -> list[str]:
    if result is None:
        return ["not measured", ""]
    alpha, stderr = result["alpha"], result.get("alpha_stderr")
    held = result["eval"]["log_loss"] - result["eval"]["log_loss_alpha0"]
    shown = f"{alpha:+.4f}" + (f" ± {stderr:.4f} ({alpha / stderr:+.1f} s.e.)" if stderr else " (no s.e.)")
    return [shown, f"{held:+.4f}"]


def head_cells(folder: str | None, gaps: dict) -> list[str]:
    if folder == "judge":  # the exact one-step F is what the other rows are judged against
        return ["1 (the judge)", "1"]
    if folder is None:  # a longer lookahead: not read against the one-step judge
        return ["not measured", "not measured"]
    metrics = read(Path(folder, "metrics.json")) or {}
    metrics = metrics.get("full", metrics)  # the shipped head keeps its learning curve beside the full run
    corr = metrics.get("validation", {}).get("onestep", {}).get("corr_within")
    gap = gaps.get(folder)
    share = ""
    if gap is not None:
        onestep = gap["folders"]["onestep"]
        share = f"{onestep['predicted']['mean'] / onestep['measured']['mean']:.2f}"
    return ["" if corr is None else f"{corr:+.3f}", share]


def cost_cells(cost: dict | None, prefix: str) -> str:
    if cost is None:
        return ""
    ratios = {row["batch_size"]: row["ratio"] for row in cost["rows"] if row["key"].startswith(prefix)}
    return " / ".join(f"{ratios[b]:.2f}" for b in sorted(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--cost", default="results/future-cost/cpu.json")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    root = Path(args.results)
    gaps = {g["head"]: g for g in map(read, sorted((root / "human-gap").glob("*.json"))) if g}
    cost = read(Path(args.cost))
    header = ["F", "within-context corr. with exact one-step", "share of the one-step human gap"]
    for text in TEXTS:
        header += [f"{text}: alpha ± s.e.", f"{text}: eval log-loss change"]
    header += ["tokens/s vs plain, batch " + ("1 / 16" if cost else "(not measured)")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stem, folder, prefix in ROWS:
        cells = [name, *head_cells(folder, gaps)]
        for text in TEXTS:
            cells += fit_cells(read(root / "lookahead-fit" / f"{text}-{stem}.json"))
        cells.append(cost_cells(cost, prefix))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    notes = ["* the shipped head's shape, read through the same calibrator path: its cost is the shipped head's"]
    if cost:
        notes.append(f"cost: {cost['machine']}, {cost['max_new_tokens']} new tokens, median of {cost['repeats']} pairs")
    table += "\n\n" + "\n\n".join(notes)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
