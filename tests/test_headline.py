"""The headline script reads the committed equal-entropy runs; it is what the README's first table prints."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path("training/smollm2-135m/headline.py")


def run(results: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results)], capture_output=True, text=True,
                          check=True)
    return done.stdout


def test_headline_reads_the_bracket_and_every_schedule(tmp_path):
    shutil.copytree("results/schedules-pydoc-256", tmp_path / "schedules-pydoc-256")
    out = run(tmp_path)
    # only the setting present is shown
    assert "pydoc, 64 held-out prompts x 256 tokens" in out and "Jane Austen" not in out
    rows = json.loads((tmp_path / "schedules-pydoc-256" / "equal_entropy.json").read_text())["rows"]
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    # header, then temperature (the reference) and min-p, the methods with their own temperature (the distilled
    # head's F at a fixed weight, the lookahead), then the schedules: F = none, the head's, the lookahead's (its
    # weight held fixed by fit --f-weight, which its name says)
    assert [line.split(" | ")[1] for line in lines[1:]] == [
        "temperature 0.9 / 0.91, interpolated (≈ 0.905)", "min-p 0.0005628 / 0.0006973, interpolated (≈ 0.000569)",
        "head's F at a fixed weight (smollm2-135m-distilled, alpha 0.1005) + temperature 0.9 / 0.91, "
        "interpolated (≈ 0.906)",
        "lookahead (F: exact one-step, alpha 0.1005, top 16) + temperature 0.92 / 0.93, interpolated (≈ 0.926)",
        "per-step temperature schedule", "the head's schedule (F: shipped head)",
        "the lookahead's schedule (F: exact one-step, top 16, its weight fixed at 0.1005)"]
    lookahead = rows["lookahead:alpha=0.1005:top=16 + temperature"]
    assert f"{lookahead['paired_difference']:+.4f} ± {lookahead['paired_stderr']:.4f}" in lines[4]
    distilled = rows["calibrated:heads/smollm2-135m-distilled:scale=1:fused=auto:past=error:alpha=0.1005 + temperature"]
    assert f"{distilled['paired_difference']:+.4f} ± {distilled['paired_stderr']:.4f}" in lines[3]
    head = rows["schedule:schedules/smollm2-135m-pydoc-256-head.json"]
    assert f"{head['paired_difference']:+.4f} ± {head['paired_stderr']:.4f}" in lines[-2]
    assert f"{head['entce']:+.3f} ± {head['entce_stderr']:.3f}" in lines[-2]
    fixed = rows["schedule:schedules/smollm2-135m-pydoc-256-lookahead-alpha.json"]
    assert f"{fixed['paired_difference']:+.4f} ± {fixed['paired_stderr']:.4f}" in lines[-1]
    assert "0 (the reference)" in lines[1] and "0 (the reference)" not in lines[2]
    assert "†" in lines[2] and "†" not in lines[3]  # min-p's log loss is the smoothed one


def test_headline_of_nothing_is_only_the_note(tmp_path):
    assert run(tmp_path).startswith("nothing measured yet")


def test_a_schedule_row_names_its_fixed_weight_and_a_single_bin(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline", SCRIPT)
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    path = tmp_path / "s.json"
    record = {"future": {"kind": "lookahead", "top": 16}, "bin_size": 64, "max_new_tokens": 128,
              "report": {"f_weight": 0.1005}}
    path.write_text(json.dumps(record))
    rank, name = headline.row_name(f"schedule:{path}", {"kind": "schedule"}, {})
    assert name == "the lookahead's schedule (F: exact one-step, top 16, its weight fixed at 0.1005)"
    assert rank == headline.RANK.index("lookahead")
    path.write_text(json.dumps({**record, "bin_size": 128, "report": {}}))  # --bin-size T: one a and one b for all 128 steps
    assert headline.row_name(f"schedule:{path}", {"kind": "schedule"}, {})[1] == (
        "the lookahead's schedule (F: exact one-step, top 16), one bin")
