"""The first-step script reads schedule histories: the closed-form slope of round 1's step, the measured
secant, and where a start schedule's secant would have put round 2."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path("training/smollm2-135m/first_step.py")


def write(path: Path, rounds: list[dict]) -> Path:
    for row in rounds:
        row.setdefault("b", [0.0, 0.0])
        row.setdefault("multiplier", 0.0)
        row.setdefault("gap_stderr", [0.1, 0.1])
    path.write_text(json.dumps({"report": {"history": rounds}}))
    return path


def test_first_step_reads_slopes_and_predicts_a_seeded_step(tmp_path):
    # The start: its last two rounds measured a slope of -10 in both bins.
    start = write(tmp_path / "start.json", [{"a": [1.0, 1.0], "gap": [0.5, 0.5]},
                                            {"a": [1.05, 1.05], "gap": [0.0, 0.0]}])
    # A fit from the start's a_j: round 1's gaps -0.2 each; its step went 0.05 (closed form -4), and the
    # gap moved by +0.4 (secant -8, twice the closed form): an overshoot to +0.2, 2 s.e.
    fit = write(tmp_path / "fit.json", [{"a": [1.05, 1.05], "gap": [-0.2, -0.2], "b": [0.1, 0.1]},
                                        {"a": [1.0, 1.0], "gap": [0.2, 0.2], "b": [0.1, 0.1]}])
    out = subprocess.run([sys.executable, str(SCRIPT), str(start), str(fit)], capture_output=True, text=True,
                         check=True).stdout
    assert "fit.json: 2 rounds; secant / closed-form slope per bin 2.00 2.00" in out
    assert "round 2 gap / s.e., measured: +2.00 +2.00" in out
    # With the start's slope -10: a step of 0.02, the gap -0.2 + 8 * 0.02 = -0.04, -0.4 s.e.
    assert "had the first step used start.json's secant (predicted): -0.40 -0.40" in out
    # The start's own first step (from a = 1, so nothing seeds it): secant -10 against closed form -10.
    assert "start.json: 2 rounds; secant / closed-form slope per bin 1.00 1.00" in out
    assert out.strip().splitlines()[-1] == "4 bins: secant / closed form 1.00 to 2.00, median 1.50"
