"""How well the entropy-matched fit's first step is sized, read from the committed schedules' histories.

For every schedule whose F weight b stayed fixed from round 1 to round 2 (a per-step temperature schedule, or
one with a fixed F weight), round 1's step was a pure Newton step on each bin's gap with the closed-form slope,
so that slope is -gap_1 / (a_2 - a_1). The measured secant is (gap_2 - gap_1) / (a_2 - a_1). Their ratio says
how much steeper a bin's gap really moves with a_j than the closed form sees (which is why round 2 overshoots).

For a schedule that started from another schedule's a_j (``fit --start``), the script also says where round 2
would have landed had round 1's step used the start's own last secant (what ``fit --start`` does now): the
gap after a step of -gap_1 / min(closed form, start secant), read on the measured secant, i.e. assuming the gap
is linear in a_j between the two rounds. A prediction, not a measurement.

    python training/smollm2-135m/first_step.py                # all schedules under schedules/
    python training/smollm2-135m/first_step.py schedules/X.json ...
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from calibrated_sampling.entropy_fit import MAX_A_STEP, secant_slope, steeper_slope

ROOT = Path(__file__).resolve().parents[2]


def history(path: Path) -> list[dict]:
    record = json.loads(path.read_text())
    return record.get("report", record).get("history", [])


def fixed_b_first_rounds(rounds: list[dict]) -> bool:
    return len(rounds) >= 2 and rounds[0]["b"] == rounds[1]["b"] and rounds[0]["multiplier"] == rounds[1]["multiplier"]


def start_of(rounds: list[dict], schedules: dict[Path, list[dict]]) -> Path | None:
    """The schedule whose final a_j this one's round 1 sampled, if any (its --start)."""
    for path, other in schedules.items():
        if other is not rounds and other and other[-1]["a"] == rounds[0]["a"] and rounds[0]["a"] != [1.0] * len(
                rounds[0]["a"]):
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schedules", nargs="*", type=Path, help="schedule files (default: schedules/*.json)")
    args = parser.parse_args(argv)
    paths = args.schedules or sorted(p for p in (ROOT / "schedules").glob("*.json") if ".rounds" not in p.name)
    schedules = {path: history(path) for path in paths}
    ratios = []
    for path, rounds in schedules.items():
        if not fixed_b_first_rounds(rounds):
            continue
        first, second = rounds[0], rounds[1]
        secant = secant_slope(rounds[:2]).tolist()
        # A step clipped to the trust region says nothing of the slope it used.
        moved = [1e-4 < abs(a2 - a1) < MAX_A_STEP - 1e-9 for a1, a2 in zip(first["a"], second["a"])]
        closed = [-g / (a2 - a1) if m else float("nan") for g, a1, a2, m in zip(first["gap"], first["a"], second["a"], moved)]
        ratio = [s / c for s, c in zip(secant, closed) if math.isfinite(s) and math.isfinite(c) and c < 0]
        ratios += ratio
        print(f"{path.name}: {len(rounds)} rounds; secant / closed-form slope per bin "
              + " ".join(f"{r:.2f}" for r in ratio))
        print("  round 2 gap / s.e., measured: " + " ".join(f"{g / s:+.2f}" for g, s in
                                                         zip(second["gap"], second["gap_stderr"])))
        start = start_of(rounds, schedules)
        seed = None if start is None else secant_slope(schedules[start])
        if seed is None:
            continue
        used = steeper_slope(torch.tensor(closed, dtype=torch.float64), seed).tolist()  # the rule of fit --start
        predicted = [(g + true * (-g / u)) / se if math.isfinite(true) and math.isfinite(u) else float("nan")
                     for g, u, true, se in zip(first["gap"], used, secant, second["gap_stderr"])]
        print(f"  round 2 gap / s.e., had the first step used {start.name}'s secant (predicted): "
              + " ".join(f"{p:+.2f}" for p in predicted))
    if ratios:
        print(f"{len(ratios)} bins: secant / closed form {min(ratios):.2f} to {max(ratios):.2f}, "
              f"median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
