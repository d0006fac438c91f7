"""The league table of future-entropy sources F: how well each tells a context's candidates apart, how much
of the human-vs-model gap it sees, what human log loss makes of it, and what it costs per token.

    python training/smollm2-135m/league.py [--out results/league/league.md]

Every figure is read from a committed result that a command in docs/results.md wrote (nothing is measured here):

- within-context correlation with the exact one-step F on the 272 held-out `onestep` contexts (train-head's
  validation split; `metrics.json` of each head; the exact one-step lookahead is that judge, so 1 by definition);
- the human gap at horizon 1, F(x, v_human) - E_p F(x, v), predicted against measured (human_gap.py; the
  first derivative of the human log loss in F's weight at 0, so an F that predicts none of it gets no weight);
- the log-loss-fitted weight alpha of F over the top 16 candidates, with its window-clustered standard error, and
  the eval-side log-loss change at that alpha (`calibrated-sampling lookahead-fit`, 24 fit / 24 eval windows x
  256 tokens; results/lookahead-fit/{text}-{name}.json), on pydoc, Jane Austen and the standard library's code;
- why a text rewards the exact one-step F: the human gap at alpha = 0 that `lookahead-fit` records per side
  (lookahead_fit.human_gap), beside the one-step lookahead at EntCE 0 from each text's equal-entropy run;
- tokens per second against plain sampling at batch 1 and 16 (benchmarks/future_cost.py --out);
- and, in a second table, each F against the judge (`calibrated-sampling judge`, results/judge/judge.json):
  within-context correlation with held-out rollout targets at 16 and 64 steps, its share of the judge's
  ceiling sqrt(split-half reliability), and R^2 within contexts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# name, the F's lookahead-fit file stem, its head folder (within-context and gap columns; "judge": the exact
# one-step F itself), its cost spec prefix, its source spec in results/judge/judge.json
ROWS = (
    ("shipped head (all label kinds)", "head-shipped", "heads/smollm2-135m", "calibrated:heads/smollm2-135m",
     "head:heads/smollm2-135m:alpha=fit"),
    ("distilled one-step head*", "head-distilled", "heads/smollm2-135m-distilled", "calibrated:heads/smollm2-135m",
     "head:heads/smollm2-135m-distilled:alpha=fit"),
    ("exact one-step lookahead, top 16", "onestep", "judge", "lookahead:alpha=0.1:top=16", "lookahead:fit"),
    ("lookahead-value (V_15 head), top 16", "value-h16", None, "lookahead-value:",
     "lookahead-value:heads/smollm2-135m-value:alpha=fit"),
    ("exact two-step, top 8 x 8", "two-step", None, "lookahead2:", "lookahead2:alpha=fit:top2=8"),
)
TEXTS = ("pydoc", "austen", "stdlib-code")
# the equal-entropy run of the exact one-step lookahead (pydoc's alpha 0.1005, its own temperature) on each text
LOOKAHEAD_RUNS = {"pydoc": ("schedules-pydoc-256", "64 prompts x 256"),
                  "austen": ("lookahead-austen-512", "32 prompts x 512"),
                  "stdlib-code": ("lookahead-stdlib-code-256", "32 prompts x 256")}
ONE_STEP_AT_ZERO = "lookahead:alpha=0.1005:top=16 + temperature"


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


def why_table(root: Path) -> str:
    """Why a text rewards the exact one-step F or not: the human gap at alpha = 0 on the fit side (lookahead_fit.
    human_gap: how often the human token is among the top 16, how much less next-step entropy it leads to than
    p's average candidate there, how spread F is), beside what the log-loss fit and the equal-entropy run made of it."""
    header = ["text", "human token in the top 16", "F(human) - E_p F there", "Var_p F there", "alpha ± s.e.",
              "eval log-loss change", "at EntCE 0: Δ vs temperature (price / temperature's)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for text in TEXTS:
        fit = read(root / "lookahead-fit" / f"{text}-onestep.json")
        if fit is None or "human_gap" not in fit["fit"]:
            lines.append(f"| {text} | not measured |" + " |" * (len(header) - 2))
            continue
        gap = fit["fit"]["human_gap"]
        alpha, held = fit_cells(fit)
        folder, size = LOOKAHEAD_RUNS[text]
        matched = read(root / folder / "equal_entropy.json")
        measured = read(root / folder / "results.json")
        row = (matched or {}).get("rows", {}).get(ONE_STEP_AT_ZERO)
        at_zero = "not measured"
        if row is not None:
            base = (measured or {}).get("samplers", {}).get("base")
            price = None if base is None else matched["rows"]["temperature"]["log_loss"] - base["log_loss"]
            share = "no base measured" if price is None else f"{(price + row['paired_difference']) / price:.0%}"
            at_zero = f"{row['paired_difference']:+.4f} ± {row['paired_stderr']:.4f} ({share}), {size}"
        lines.append(f"| {text} | {gap['in_top_fraction']:.0%} | {gap['gap']:+.4f} ± {gap['gap_stderr']:.4f} | "
                     f"{gap['spread']:.3f} | {alpha} | {held} | {at_zero} |")
    return "\n".join(lines) + (
        "\n\nwhy: the human gap at alpha = 0 on the fit side (24 windows x 256 tokens), F the exact one-step entropy;"
        " the log loss's slope in alpha at 0 is the share times the gap, its curvature the share times Var_p F,"
        " so alpha ~ -gap / Var_p F. Δ at EntCE 0: the one-step lookahead at pydoc's alpha 0.1005 with its own"
        " temperature against temperature, paired, from the equal-entropy runs of docs/results.md; price / temperature's: the"
        " lookahead's log-loss price over the base as a share of temperature's")


def judge_table(judge: dict | None) -> str:
    """Each F against the held-out rollout judges: correlation (share of the ceiling) and R^2, within contexts."""
    if judge is None:
        return "judge: not measured (calibrated-sampling judge --out results/judge/judge.json)"
    judges = judge["judges"]
    names = [f"{Path(j['folder']).name.removeprefix('judge-')}" for j in judges]
    lines = ["| F | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines.append("| ceiling (split-half reliability) | "
                 + " | ".join(f"{j['ceiling']:.2f} ({j['reliability']:.2f})" for j in judges) + " |")
    for name, *_, source in ROWS:
        cells = []
        for j in judges:
            row = j["sources"].get(source)
            if row is None:
                cells.append("not measured")
                continue
            # a share of a ceiling under 0.3 is no share: the split-half estimate is noise there
            share = f" ({row['share_of_ceiling']:.2f})" if j["ceiling"] >= 0.3 else ""
            cells.append(f"{row['corr_within']:+.2f}{share}, R² {row['r2_within']:+.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rollouts = sorted({j["rollouts"] for j in judges})
    contexts = sorted({j["contexts"] for j in judges})
    return "\n".join(lines) + (
        f"\n\njudge: within-context correlation with rollout targets (share of the ceiling in brackets, left out"
        f" where the ceiling is under 0.3); R² within contexts, F read as a prediction of the target (it means"
        f" something only for an F that claims the judge's horizon: the shipped head, read at K, and lookahead-value);"
        f" {'/'.join(map(str, contexts))} held-out contexts,"
        f" the human token and q's top 8, {'/'.join(map(str, rollouts))} rollouts each under common random numbers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--cost", default="results/future-cost/cpu.json")
    parser.add_argument("--judge", default="results/judge/judge.json")
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
    for name, stem, folder, prefix, _ in ROWS:
        cells = [name, *head_cells(folder, gaps)]
        for text in TEXTS:
            cells += fit_cells(read(root / "lookahead-fit" / f"{text}-{stem}.json"))
        cells.append(cost_cells(cost, prefix))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    notes = ["* the shipped head's shape, read through the same calibrator path: its cost is the shipped head's"]
    if cost:
        notes.append(f"cost: {cost['machine']}, {cost['max_new_tokens']} new tokens, median of {cost['repeats']} pairs")
    table += ("\n\n" + "\n\n".join(notes) + "\n\n" + why_table(root) + "\n\n"
              + judge_table(read(Path(args.judge))))
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
