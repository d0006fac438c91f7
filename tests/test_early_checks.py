"""Inputs checked before any work starts (issue 14): non-finite values, samplers named twice, head folders,
counts, journal lines of the wrong shape, files that are not text, scores of another vocabulary."""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from conftest import make_model
from test_calibrator import make_head
from test_compare import random_windows
from test_measure import _cli_measure_args

from calibrated_sampling import compare as compare_module
from calibrated_sampling.calibrator import FutureEntropyCalibrator, constant_calibration
from calibrated_sampling.cli import main
from calibrated_sampling.compare import Preset, run_comparison
from calibrated_sampling.data import load_documents
from calibrated_sampling.journal import Journal
from calibrated_sampling.lookahead import LookaheadProcessor
from calibrated_sampling.samplers import parse_sampler, resolve_samplers

measure_module = importlib.import_module("calibrated_sampling.measure")
pytestmark = pytest.mark.usefixtures("one_thread")


# --- non-finite values, duplicates ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, name", [
    ("top_p=nan", "top_p"), ("eta=nan", "eta"), ("epsilon=nan", "epsilon"), ("min_p=nan", "min_p"),
    ("typical_p=nan", "typical_p"), ("temperature=inf", "temperature"), ("temperature=0.9+top_p=nan", "top_p"),
    ("lookahead:alpha=nan", "alpha"), ("lookahead:alpha=-inf:top=2", "alpha"),
    ("calibrated:heads/none:scale=nan", "scale"), ("calibrated:heads/none:scale=inf", "scale"),
])
def test_non_finite_values_are_refused_naming_the_term(spec, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number, but is"):
        parse_sampler(spec, make_model())


def test_a_sampler_named_twice_is_refused(tmp_path, capsys):
    for samplers in ("base,base", "temperature=0.9,temperature=0.90"):  # before the (missing) model loads
        code = main(["measure", "--model", str(tmp_path / "missing"), "--samplers", samplers,
                     "--out", str(tmp_path / "out")])
        assert code == 2 and "names one sampler twice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'lookahead:alpha=0.1' and 'lookahead:alpha=0.10:top=16'"):
        resolve_samplers(["lookahead:alpha=0.1", "lookahead:alpha=0.10:top=16"], make_model())


# --- head folders and specs: before the model loads, or at least before anything is measured --------------

def test_compare_with_a_mistyped_head_folder_fails_before_any_measurement(tiny, tmp_path, capsys, monkeypatch):
    code = main(["compare", "--model", str(tmp_path / "missing-model"), "--heads", str(tmp_path / "no-such-head"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "no-such-head does not exist" in capsys.readouterr().err  # the head, not the model
    model, tok = tiny
    calls = []
    monkeypatch.setattr(compare_module, "measure", lambda *a, **k: calls.append(a[3][0].spec))
    preset = Preset(num_prompts=2, max_new_tokens=3, fit_prompts=0, search_iterations=0, lookahead_top=2,
                    batch_size=2)
    journal = tmp_path / "measurements.jsonl"
    with pytest.raises(FileNotFoundError, match="no-such-head"):
        run_comparison(model, tok, random_windows(2, [4], 3), None, preset, heads=[str(tmp_path / "no-such-head")],
                       journal=journal)
    assert calls == [] and not journal.exists()


def test_measure_checks_every_spec_before_measuring_any(tmp_path, tiny_model, capsys, monkeypatch):
    args = _cli_measure_args(tmp_path, tiny_model)
    out = tmp_path / "out"
    assert main([*args, "--samplers", f"base,calibrated:{tmp_path / 'no-such-head'}", "--out", str(out)]) == 2
    assert "no-such-head does not exist" in capsys.readouterr().err
    # A head of another model is refused once the model is there, still before `base` is measured.
    other = make_model(vocab=50)
    make_head(other, family="tied", calibration=constant_calibration(1.0, 0.0, 10)).save_pretrained(tmp_path / "other")
    calls = []
    monkeypatch.setattr(measure_module, "measure", lambda *a, **k: calls.append(a[3][0].spec))
    assert main([*args, "--samplers", f"base,calibrated:{tmp_path / 'other'}", "--out", str(out)]) == 2
    assert "vocab" in capsys.readouterr().err
    assert calls == [] and not (out / "measurements.jsonl").exists()


def test_a_count_of_0_is_refused_before_the_journal_is_written(tmp_path, tiny_model, capsys):
    args = _cli_measure_args(tmp_path, tiny_model)
    out = tmp_path / "out"
    assert main([*args, "--batch-size", "0", "--samplers", "base", "--out", str(out)]) == 2
    assert not out.exists()  # no journal header, which the rerun below would take for another run's
    assert "`--batch-size` must be at least 1, but is 0" in capsys.readouterr().err
    assert main([*args, "--samplers", "base", "--out", str(out)]) == 0  # the corrected rerun into the same folder
    # compare took a 0 for "no override" and ran with the preset's batch size
    code = main(["compare", "--model", str(tmp_path / "missing"), "--batch-size", "0", "--out", str(out / "c")])
    assert code == 2 and "`batch_size` must be an integer of at least 1, but is 0" in capsys.readouterr().err


def test_generate_checks_the_head_folder_and_scale_before_the_model_loads(tmp_path, capsys):
    base = ["generate", "--model", str(tmp_path / "missing-model"), "--prompt", "w1"]
    assert main([*base, "--head", str(tmp_path / "no-such-head")]) == 2
    assert "no-such-head does not exist" in capsys.readouterr().err
    assert main([*base, "--head", str(tmp_path), "--scale", "nan"]) == 2
    assert "`scale` must be a finite number" in capsys.readouterr().err


# --- the journal keeps its good entries -------------------------------------------------------------------

def test_journal_lines_of_the_wrong_shape_are_set_aside_and_the_good_ones_kept(tmp_path):
    path = tmp_path / "measurements.jsonl"
    journal = Journal(path, "fp")
    journal.add("base", {"entce": 1.0})
    journal.add("top_p=0.9", {"entce": 2.0})
    lines = path.read_text().splitlines()
    wrong = ["[1, 2]", '{"key": "temperature=0.9"}', '"text"', '{"key": 3, "value": 1}']
    path.write_text("\n".join([lines[0], lines[1], *wrong, lines[2]]) + "\n")
    with pytest.warns(UserWarning, match=r"measurements.jsonl: line 3, 4, 5, 6 are damaged .* 2 good entries"):
        again = Journal(path, "fp")
    assert again.entries == {"base": {"entce": 1.0}, "top_p=0.9": {"entce": 2.0}}
    assert (tmp_path / "measurements.jsonl.damaged").read_text().splitlines() == wrong  # nothing is lost
    assert path.read_text().splitlines() == lines
    path.write_text("[]\n")
    with pytest.raises(ValueError, match="measurements.jsonl line 1 is not a journal header"):
        Journal(path, "fp")


# --- data that is not text, scores of another vocabulary -----------------------------------------------

def test_files_that_are_not_text_are_refused_naming_the_file(tmp_path):
    noise = tmp_path / "corpus" / "noise.txt"
    noise.parent.mkdir()
    noise.write_bytes(random.Random(0).randbytes(20_000))
    with pytest.raises(ValueError, match="noise.txt is not UTF-8 text"):
        load_documents(str(noise))
    (tmp_path / "corpus" / "good.txt").write_text("Some prose.\n\nMore prose.")
    with pytest.raises(ValueError, match="noise.txt is not UTF-8 text"):
        load_documents(str(tmp_path / "corpus"))
    # A stray byte of another encoding in real text is not refused.
    (tmp_path / "latin.txt").write_bytes(("Prose " * 400).encode() + "caf\xe9".encode("latin-1"))
    assert load_documents(str(tmp_path / "latin.txt"))


def test_scores_of_another_vocabulary_get_a_named_error(tiny):
    model, tok = tiny
    calibrator = FutureEntropyCalibrator(make_head(model, tok), constant_calibration(1.0, 0.1, 8))
    ids = torch.tensor([[5, 6, 7]])
    with calibrator.attached(model), torch.no_grad():
        model(ids)
        with pytest.raises(ValueError, match="`scores` has 100 columns, but the head's vocabulary has 99 tokens"):
            calibrator(ids, torch.zeros(1, 100))
    with pytest.raises(ValueError, match="`base_logits` has 98 columns"):
        calibrator.teacher_forced_logits(torch.zeros(1, 98), torch.zeros(1, 32), 0)
    lookahead = LookaheadProcessor(model, 0.1, top=2)
    with pytest.raises(ValueError, match="`scores` has 100 columns, but the lookahead's model has a vocabulary of 99"):
        lookahead(ids, torch.zeros(1, 100))
