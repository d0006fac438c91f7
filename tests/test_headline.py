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


def test_the_cost_column_reads_one_side_by_side_benchmark_by_kind(tmp_path):
    """Every row's time comes from one benchmark run, looked up by what its cost depends on (family and
    candidates, not temperature or weight); a row of a kind not timed shows a dash."""
    shutil.copytree("results/schedules-pydoc-256", tmp_path / "schedules-pydoc-256")
    (tmp_path / "future-cost").mkdir()
    rows = [{"spec": spec, "batch_size": 16, "ratio": ratio, "plain_tokens_per_s": 50.0,
             "sampler_tokens_per_s": 50.0 * ratio}
            for spec, ratio in (("temperature=0.5", 0.98), ("lookahead:alpha=0.3:top=16:temperature=1.1", 0.25),
                                ("schedule:schedules/smollm2-135m-pydoc-128-lookahead-alpha.json", 0.2))]
    rows.append({**rows[0], "batch_size": 1, "ratio": 0.5})  # batch 1 is not the column's
    (tmp_path / "future-cost" / "headline.json").write_text(json.dumps(
        {"machine": "smollm2-135m (float32, CPU, x86_64, 2 torch threads)", "rows": rows}))
    lines = [line for line in run(tmp_path).splitlines() if line.startswith("| pydoc")]
    cost = {line.split(" | ")[1].split(" ")[0]: line.rsplit(" | ", 1)[1].removesuffix(" |") for line in lines}
    assert cost["temperature"] == f"{1 / 49:.4f} (0.98)"
    assert cost["lookahead"] == f"{1 / 12.5:.4f} (0.25)"  # another alpha and temperature: the same kind
    assert cost["min-p"] == "—"
    # the lookahead's schedule at top 16: any schedule file with that F is the same kind
    assert lines[-1].endswith(f"{1 / 10:.4f} (0.20) |")
    assert "50.0 tokens/s there" in run(tmp_path)


def test_only_names_settings_and_refuses_an_unknown_one(tmp_path):
    for folder in ("schedules-pydoc-256", "schedules-pydoc-128"):
        shutil.copytree(f"results/{folder}", tmp_path / folder)
    every = run(tmp_path)
    assert "| pydoc 256 |" in every and "| pydoc 128 |" in every
    readme = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--only", "README"],
                            capture_output=True, text=True, check=True).stdout
    assert "| pydoc 256 |" in readme and "| pydoc 128 |" not in readme  # pydoc 128 is not on the README's screen
    named = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--only", "pydoc 128"],
                           capture_output=True, text=True, check=True).stdout
    assert "| pydoc 128 |" in named and "| pydoc 256 |" not in named
    wrong = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--only", "pydoc 999"],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "`--only` 'pydoc 999'" in wrong.stderr and "pydoc 128" in wrong.stderr


def test_the_plot_draws_every_row_but_the_reference(tmp_path):
    from importlib import util

    spec = util.spec_from_file_location("headline", SCRIPT)
    headline = util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    shutil.copytree("results/schedules-pydoc-256", tmp_path / "schedules-pydoc-256")
    rows = json.loads((tmp_path / "schedules-pydoc-256" / "equal_entropy.json").read_text())["rows"]
    out = tmp_path / "plot" / "headline.png"
    drawn = headline.plot(tmp_path, headline.SETTINGS, out)
    assert drawn == len(rows) - 1  # temperature, the reference, is the line at 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert headline.plot(tmp_path / "nothing", headline.SETTINGS, tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
