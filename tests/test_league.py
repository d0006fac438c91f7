"""The league script reads committed results only; its "why" table puts a text's human gap beside what the
equal-entropy run made of the one-step F."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path("training/smollm2-135m/league.py")


def test_why_table_reads_the_gap_and_the_equal_entropy_run(tmp_path):
    (tmp_path / "lookahead-fit").mkdir()
    shutil.copy("results/lookahead-fit/stdlib-code-onestep.json", tmp_path / "lookahead-fit")
    run = tmp_path / "lookahead-stdlib-code-256"
    run.mkdir()
    for name in ("equal_entropy.json", "results.json"):
        shutil.copy(Path("results/lookahead-stdlib-code-256") / name, run / name)
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--cost", str(tmp_path / "none"),
                           "--judge", str(tmp_path / "none")], capture_output=True, text=True, check=True)
    lines = {line.split(" | ")[0]: line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "| pydoc" in lines and "not measured" in lines["| pydoc"]  # no fit there: said, not guessed
    fit = json.loads((tmp_path / "lookahead-fit" / "stdlib-code-onestep.json").read_text())
    gap = fit["fit"]["human_gap"]
    row = lines["| stdlib-code"]
    assert f"| {gap['in_top_fraction']:.0%} | {gap['gap']:+.4f} ± {gap['gap_stderr']:.4f} | {gap['spread']:.3f} |" in row
    matched = json.loads((run / "equal_entropy.json").read_text())["rows"]
    lookahead = matched["lookahead:alpha=0.1005:top=16 + temperature"]
    base = json.loads((run / "results.json").read_text())["samplers"]["base"]["log_loss"]
    price = matched["temperature"]["log_loss"] - base  # temperature's price over the base; the lookahead's is less
    share = (price + lookahead["paired_difference"]) / price
    assert f"{lookahead['paired_difference']:+.4f} ± {lookahead['paired_stderr']:.4f} ({share:.0%})" in row
    assert "judge: not measured" in done.stdout
