"""The matched-entropy reading: find_root's measured bracket and its standard-error stopping rule, the
interpolation at EntCE = 0, paired differences, per-bin EntCE, and `compare --schedules` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import EOS_ID, VOCAB, make_tokenizer
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper

from calibrated_sampling.cli import main
from calibrated_sampling.compare import find_root
from calibrated_sampling.equal_entropy import (
    equal_entropy,
    family,
    interpolate_at_zero,
    matched_entry,
    measured_equal_entropy,
    measured_matches,
    paired_difference,
)
from calibrated_sampling.metrics import per_bin_entce
from calibrated_sampling.models import load_model
from calibrated_sampling.schedule import save_schedule

# --- find_root -------------------------------------------------------------------------------------------


def test_find_root_returns_the_bracket_as_measured_not_the_halved_values():
    def f(x):  # convex: the secant lands on the same side again and again, so Illinois halves the stale end
        return math.exp(4 * x) - 2

    found = find_root(f, 0.0, 1.0, f(0.0), f(1.0), iterations=4, digits=6)
    (lo, f_lo), (hi, f_hi) = found["bracket"]
    assert lo < hi and f_lo < 0 < f_hi
    assert f_lo == f(lo) and f_hi == f(hi)  # the measured values, not the halved ones
    assert [lo, f_lo] in found["history"] and [hi, f_hi] in found["history"]
    assert found["x"] in (lo, hi) and abs(found["fx"]) == min(abs(f_lo), abs(f_hi))


def test_find_root_stops_when_both_ends_are_within_their_standard_error():
    def f(x):
        return x - 0.5

    # Ends at -0.05 and +0.05 with a standard error of 0.07: nothing to gain from narrowing the bracket.
    by_se = find_root(f, 0.45, 0.55, -0.05, 0.05, iterations=6, tol=0.01, stderr=lambda x: 0.07)
    assert by_se["converged"] and len(by_se["history"]) == 2
    # A fixed tolerance of 0.01 goes on measuring.
    by_tol = find_root(f, 0.45, 0.55, -0.05, 0.05, iterations=6, tol=0.01)
    assert len(by_tol["history"]) > 2
    # One end within its s.e., the other not: it goes on.
    def g(x):
        return x ** 3 - 0.125

    one_end = find_root(g, 0.45, 0.9, g(0.45), g(0.9), iterations=8, stderr=lambda x: 0.07)
    assert len(one_end["history"]) > 2 and one_end["converged"]
    assert all(abs(fx) <= 0.07 for _, fx in one_end["bracket"])
    # A NaN standard error (one prompt) falls back to the tolerance.
    nan_se = find_root(f, 0.45, 0.55, -0.05, 0.05, iterations=0, tol=0.01, stderr=lambda x: math.nan)
    assert not nan_se["converged"]


# --- interpolation at EntCE = 0 ------------------------------------------------------------------------


def summary(entce, log_loss, distinct, per_prompt=True, truncating=False, seconds=1.0):
    r = {"entce": entce, "entce_stderr": 0.05, "log_loss": log_loss, "log_loss_smoothed": log_loss + 0.001,
         "truncated_fraction": 0.0, "gen_entropy": log_loss + entce, "distinct_2": distinct, "self_bleu": 0.2,
         "seq_rep_4": 0.01, "truncating": truncating, "seconds": seconds, "roles": [],
         "per_step": {"gen_entropy": [log_loss + entce] * 4, "log_loss": [log_loss] * 4,
                      "log_loss_smoothed": [log_loss + 0.001] * 4, "count": [2] * 4, "log_loss_count": [2] * 4}}
    if per_prompt:
        r["per_prompt"] = {"log_loss": [log_loss - 0.1, log_loss + 0.1], "log_loss_smoothed": [log_loss] * 2,
                           "gen_entropy": [log_loss + entce] * 2, "entce": [entce] * 2}
    return r


def test_two_measurements_at_minus_and_plus_0_1_give_the_midpoint():
    lo, hi = summary(-0.1, 3.0, 0.5), summary(0.1, 3.2, 0.7)
    out = interpolate_at_zero(lo, hi)
    assert out["weight"] == pytest.approx(0.5) and out["entce"] == 0.0
    assert out["log_loss"] == pytest.approx(3.1) and out["distinct_2"] == pytest.approx(0.6)
    assert out["gen_entropy"] == pytest.approx(3.1)
    assert out["per_prompt"]["log_loss"] == pytest.approx([3.0, 3.2])
    # Unequal distances: the weight follows EntCE linearly.
    assert interpolate_at_zero(summary(-0.3, 3.0, 0.5), hi)["log_loss"] == pytest.approx(3.15)
    # Infinite log loss at an end with weight: inf, not NaN; an older measurement: no per-prompt values.
    truncating = {**summary(0.1, 3.2, 0.7, per_prompt=False), "log_loss": math.inf, "truncating": True}
    out = interpolate_at_zero(lo, truncating)
    assert out["log_loss"] == math.inf and out["truncating"] and out["per_prompt"] is None
    assert interpolate_at_zero(summary(0.0, 3.0, 0.5), truncating)["log_loss"] == 3.0


def test_matched_entry_keeps_both_ends_and_the_nearest_spec():
    results = {"temperature=0.9": summary(-0.02, 3.0, 0.5), "temperature=1": summary(0.06, 3.2, 0.7)}
    points = {0.9: "temperature=0.9", 1.0: "temperature=1"}
    found = {"x": 0.9, "fx": -0.02, "bracket": [[0.9, -0.02], [1.0, 0.06]], "history": [], "converged": True}
    entry = matched_entry(found, points, results)
    assert entry["spec"] == "temperature=0.9" and entry["weight"] == pytest.approx(0.25)
    assert entry["value_at_zero"] == pytest.approx(0.925) and entry["log_loss"] == pytest.approx(3.05)
    assert [end["spec"] for end in entry["bracket"]] == ["temperature=0.9", "temperature=1"]
    assert [end["entce"] for end in entry["bracket"]] == [-0.02, 0.06]


def test_paired_difference_and_the_equal_entropy_rows():
    results = {"temperature=0.9": summary(-0.1, 3.0, 0.5), "temperature=1": summary(0.1, 3.2, 0.7),
               "schedule:s.json": {**summary(0.01, 3.05, 0.65), "roles": ["schedule"]},
               "old": {**summary(0.0, 3.0, 0.6, per_prompt=False), "roles": ["schedule"]}}
    results["schedule:s.json"]["per_prompt"]["log_loss"] = [3.0, 3.1]
    points = {0.9: "temperature=0.9", 1.0: "temperature=1"}
    found = {"x": 0.9, "fx": -0.1, "bracket": [[0.9, -0.1], [1.0, 0.1]], "history": [], "converged": True}
    matched = {"temperature": {**matched_entry(found, points, results), "knob": "temperature"}}
    paired = paired_difference(results["schedule:s.json"], matched["temperature"])
    # Per prompt: 3.0 - 3.0 and 3.1 - 3.2: mean -0.05, s.e. = sd / sqrt(2) = 0.05.
    assert paired["difference"] == pytest.approx(-0.05) and paired["stderr"] == pytest.approx(0.05)
    equal = equal_entropy(results, matched)
    assert equal["reference"] == "temperature=0.9"
    row = equal["rows"]["schedule:s.json"]
    assert row["paired_difference"] == pytest.approx(-0.05) and row["paired_prompts"] == 2
    assert row["max_abs_bin_entce"] == pytest.approx(0.01) and row["seconds_per_token"] == pytest.approx(1 / 8)
    assert equal["rows"]["temperature"]["paired_difference"] == pytest.approx(0.0, abs=1e-12)
    old = equal["rows"]["old"]  # a measurement from before per-prompt values: the difference, no s.e.
    assert old["paired_difference"] == pytest.approx(-0.1) and math.isnan(old["paired_stderr"])


def test_a_measure_run_is_read_at_equal_entropy_from_its_own_brackets():
    """`measure` with two temperatures around EntCE 0 and a schedule: the schedule's row against temperature
    interpolated between them; base counts as temperature 1 and top-p 1; a knob without a bracket is left out."""
    results = {"base": summary(0.3, 3.3, 0.8), "temperature=0.9": summary(-0.1, 3.0, 0.5),
               "temperature=0.95": summary(0.1, 3.2, 0.7), "top_p=0.95": summary(0.2, 3.25, 0.75),
               "schedule:s.json": summary(0.0, 3.05, 0.65)}
    results["schedule:s.json"]["per_prompt"]["log_loss"] = [3.0, 3.1]
    equal = measured_equal_entropy(results)
    assert equal["reference"] == "temperature=0.9"  # the end nearest zero (a tie: the first)
    assert set(equal["rows"]) == {"temperature", "schedule:s.json"}  # top-p 0.95 and 1: both above 0
    assert equal["rows"]["temperature"]["log_loss"] == pytest.approx(3.1)
    row = equal["rows"]["schedule:s.json"]
    assert row["kind"] == "schedule" and row["paired_difference"] == pytest.approx(-0.05)
    assert row["paired_stderr"] == pytest.approx(0.05)
    assert "roles" not in results["base"] or results["base"]["roles"] == []  # the caller's results untouched
    # No temperature bracket: nothing to read against.
    assert measured_equal_entropy({"base": summary(0.3, 3.3, 0.8), "temperature=0.95": summary(0.1, 3.2, 0.7)}) is None


def test_a_lookahead_with_its_own_temperature_is_a_knob_read_at_equal_entropy():
    """Lookaheads of one alpha and top at several temperatures form one family, whose temperature is read at
    EntCE = 0 like temperature's, the lookahead at temperature 1 (however spelled) its end at T = 1."""
    results = {"temperature=0.9": summary(-0.1, 3.0, 0.5), "temperature=0.95": summary(0.1, 3.2, 0.7),
               "lookahead:alpha=0.1": summary(0.6, 2.9, 0.8),  # top 16 and temperature 1 by default
               "lookahead:alpha=0.1:top=16:temperature=0.93": summary(0.1, 3.02, 0.6),
               "lookahead:alpha=0.1:top=16:temperature=0.92": summary(-0.3, 3.1, 0.5),
               "lookahead:alpha=0.2:top=16:temperature=0.9": summary(0.2, 3.0, 0.5)}  # another family, no bracket
    family_name = "lookahead:alpha=0.1:top=16 + temperature"
    assert family("lookahead:alpha=0.1:top=16:temperature=0.93") == (family_name, 0.93)
    assert family("lookahead:alpha=0.1:top=16:temperature=1") == ("lookahead", 0.1)
    matches = measured_matches(results)
    assert set(matches) == {"temperature", family_name}
    entry = matches[family_name]
    assert [end["spec"] for end in entry["bracket"]] == ["lookahead:alpha=0.1:top=16:temperature=0.92",
                                                         "lookahead:alpha=0.1:top=16:temperature=0.93"]
    assert entry["value_at_zero"] == pytest.approx(0.9275) and entry["log_loss"] == pytest.approx(3.04)
    row = measured_equal_entropy(results)["rows"][family_name]
    assert row["kind"] == "matched" and row["entce"] == 0.0
    # per prompt: lookahead 3.04 -/+ 0.1, temperature 3.1 -/+ 0.1 -> -0.06 on both, s.e. 0
    assert row["paired_difference"] == pytest.approx(-0.06) and row["paired_stderr"] == pytest.approx(0.0, abs=1e-12)
    # Above 0 at 0.93 and at 1 (the spec without a temperature): no bracket there, so 0.92-0.93 is the one.
    del results["lookahead:alpha=0.1:top=16:temperature=0.92"]
    assert family_name not in measured_matches(results)
    # The two-step lookahead takes a temperature the same way: its own family, its T = 1 spec the end at 1.
    two_step = {"lookahead2:alpha=0.1": summary(0.5, 2.9, 0.8),
                "lookahead2:alpha=0.1:top=8:top2=8:temperature=0.9": summary(-0.1, 3.0, 0.5)}
    two_step_name = "lookahead2:alpha=0.1:top=8:top2=8 + temperature"
    assert family("lookahead2:alpha=0.1:temperature=0.9") == (two_step_name, 0.9)
    entry = measured_matches({**results, **two_step})[two_step_name]
    assert [end["value"] for end in entry["bracket"]] == [0.9, 1.0]
    assert entry["value_at_zero"] == pytest.approx(0.9 + 0.1 / 6)
    # And the lookahead with a learned state value: its family names the folder as a key does.
    value_name = "lookahead-value:heads/v:alpha=0.02:top=16 + temperature"
    assert family("lookahead-value:heads/v:alpha=0.02:top=16:temperature=0.95") == (value_name, 0.95)
    assert family("lookahead-value:heads/v/:alpha=0.020:temperature=0.9")[0] == value_name
    assert family("lookahead-value:heads/v:alpha=0.02:top=16:horizon=4:temperature=0.9")[0] != value_name
    value_runs = {"lookahead-value:heads/v:alpha=0.02": summary(0.5, 2.9, 0.8),
                  "lookahead-value:heads/v:alpha=0.02:temperature=0.9": summary(-0.1, 3.0, 0.5)}
    entry = measured_matches({**results, **value_runs})[value_name]
    assert [end["spec"] for end in entry["bracket"]] == ["lookahead-value:heads/v:alpha=0.02:temperature=0.9",
                                                         "lookahead-value:heads/v:alpha=0.02"]
    # A head's fixed-weight form (calibrated:DIR:alpha=A:temperature=T) likewise; the digest a key pins is left
    # out of the family, and the fitted-calibration form stays a scale family.
    head_name = "calibrated:heads/d:scale=1:fused=auto:past=error:alpha=0.1 + temperature"
    assert family("calibrated:heads/d:alpha=0.1:temperature=0.9") == (head_name, 0.9)
    assert family("calibrated:heads/d/:scale=1:fused=auto:past=error:sha256=0123456789abcdef:alpha=0.10:"
                  "temperature=0.95") == (head_name, 0.95)
    assert family("calibrated:heads/d:scale=0.5") == ("calibrated d", 0.5)
    head_runs = {"calibrated:heads/d:alpha=0.1": summary(0.5, 2.9, 0.8),
                 "calibrated:heads/d:alpha=0.1:temperature=0.9": summary(-0.1, 3.0, 0.5),
                 "calibrated:heads/d:scale=0.5": summary(0.4, 2.9, 0.8)}
    entry = measured_matches({**results, **head_runs})[head_name]
    assert [end["spec"] for end in entry["bracket"]] == ["calibrated:heads/d:alpha=0.1:temperature=0.9",
                                                         "calibrated:heads/d:alpha=0.1"]


# --- per-bin EntCE ----------------------------------------------------------------------------------------


def test_per_bin_entce_weights_the_generation_side_by_count():
    steps = 130  # bins [0, 64), [64, 128), [128, 130)
    per_step = {"gen_entropy": [1.0] * 64 + [2.0] * 64 + [3.0, 5.0], "count": [4] * 128 + [3, 1],
                "log_loss": [1.5] * steps, "log_loss_smoothed": [1.0] * steps}
    cal = per_bin_entce(per_step)
    assert cal["starts"] == [0, 64, 128] and cal["width"] == 64 and cal["edge"] == 64
    assert cal["gen_entropy"] == pytest.approx([1.0, 2.0, (3 * 3 + 5) / 4])
    assert cal["entce"] == pytest.approx([-0.5, 0.5, 3.5 - 1.5])
    assert cal["max_abs_entce"] == pytest.approx(2.0)
    # First 64 steps -> last 64 (steps 66..129): entropy (62 * 2 * 4 + 3 * 3 + 5) / (62 * 4 + 4).
    assert cal["gen_change"] == pytest.approx((62 * 8 + 14) / 252 - 1.0) and cal["log_loss_change"] == 0
    assert per_bin_entce(per_step, smoothed=True)["entce"][0] == pytest.approx(0.0)


def test_per_bin_entce_on_a_short_generation_and_empty_steps():
    per_step = {"gen_entropy": [2.0, 4.0, math.nan, math.nan], "count": [2, 2, 0, 0], "log_loss": [3.0] * 4}
    cal = per_bin_entce(per_step)
    assert cal["width"] == 4 and cal["entce"] == pytest.approx([0.0])  # one bin: the whole length
    assert cal["edge"] == 2 and math.isnan(cal["gen_change"])  # nothing runs in the last two steps
    assert math.isnan(per_bin_entce(per_step, width=2)["entce"][1])
    assert per_bin_entce(per_step, width=2)["max_abs_entce"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="`width` must be a positive integer, but is 0"):
        per_bin_entce(per_step, width=0)


# --- compare --schedules, end to end ---------------------------------------------------------------------


def schedule_fit(steps, a=(1.0, 1.0)):
    return {"objective": "entropy", "form": "untied", "max_new_tokens": steps, "bin_size": steps // 2, "a": list(a),
            "b": [0.0, 0.0], "future": {"kind": "none"}, "report": {"converged": True, "rounds": 1, "bins": []}}


def model_text(model, n: int, length: int, temperature: float) -> list[str]:
    """``n`` documents sampled from ``model`` at ``temperature`` (words of the tiny tokenizer; no special
    tokens): "human" text whose EntCE = 0 temperature lies near ``temperature``."""
    torch.manual_seed(0)
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor([0, 1, EOS_ID]),
                                      TemperatureLogitsWarper(temperature)])
    start = torch.randint(3, VOCAB, (n, 1))
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=length, min_new_tokens=length,
                             logits_processor=processors, pad_token_id=0)
    return [" ".join(f"w{i - 3}" for i in row) for row in out.tolist()]


def test_cli_compare_with_schedules_reads_them_at_equal_entropy(tmp_path, tiny_model, capsys):
    tok = make_tokenizer()
    tiny_model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model, tokenizer = load_model(str(tmp_path / "model"))
    save_schedule(tmp_path / "flat.json", schedule_fit(8), model, tokenizer)
    save_schedule(tmp_path / "cool.json", schedule_fit(8, a=(1.4, 1.4)), model, tokenizer)
    save_schedule(tmp_path / "long.json", schedule_fit(16), model, tokenizer)
    (tmp_path / "text").mkdir()
    for i, text in enumerate(model_text(model, 32, 40, temperature=0.7)):
        (tmp_path / "text" / f"{i}.txt").write_text(text)
    args = ["compare", "--quick", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "text"),
            "--num-prompts", "8", "--max-new-tokens", "8", "--prompt-tokens", "6", "--batch-size", "8",
            "--no-lookahead"]
    # A schedule fitted for another length is refused before anything is measured or written.
    both = f"{tmp_path / 'flat.json'},{tmp_path / 'long.json'}"
    assert main([*args, "--out", str(tmp_path / "refused"), "--schedules", both]) == 2
    assert "max_new_tokens = 16" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "refused"), "--schedules", str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err

    schedules = [str(tmp_path / "flat.json"), str(tmp_path / "cool.json")]
    assert main([*args, "--out", str(tmp_path / "a"), "--schedules", ",".join(schedules)]) == 0
    printed = capsys.readouterr().out
    assert "At equal entropy (EntCE = 0)" in printed and "Per-step calibration" in printed
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    rows = results["equal_entropy"]["rows"]
    assert {f"schedule:{s}" for s in schedules} | {"temperature", "top_p", "min_p"} <= set(rows)
    for spec in (f"schedule:{s}" for s in schedules):
        assert results["samplers"][spec]["roles"] == ["schedule"]
        assert len(results["samplers"][spec]["per_prompt"]["log_loss"]) == 8
        row = rows[spec]
        assert math.isfinite(row["max_abs_bin_entce"]) and row["seconds_per_token"] > 0
        assert math.isfinite(row["paired_difference"]) and row["paired_stderr"] > 0 and row["paired_prompts"] == 8
    temperature = results["matched"]["temperature"]
    assert temperature["bracket"] and results["equal_entropy"]["reference"] == temperature["spec"]
    for m in results["matched"].values():
        assert m["bracket"] is None or (len(m["bracket"]) == 2 and 0 <= m["weight"] <= 1 and m["entce"] == 0.0)
    assert (tmp_path / "a" / "per_bin_entce.png").stat().st_size > 500
    report = (tmp_path / "a" / "report.md").read_text()
    assert "schedule:" in report.split("At equal entropy")[1]
