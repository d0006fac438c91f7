"""Inputs checked before any work starts (issue 14): non-finite values, samplers named twice, head folders,
counts, journal lines of the wrong shape, files that are not text, scores of another vocabulary."""

from __future__ import annotations

import importlib
import math
import random
import re

import pytest
import torch
from conftest import make_model, make_tokenizer
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


# --- outputs, devices and model names: refused before the model loads ------------------------------------

def _no_model(tmp_path) -> str:
    return str(tmp_path / "missing-model")  # were the check late, the error would name the model instead


@pytest.mark.parametrize("command, kind", [
    (["measure", "--samplers", "base"], "folder"), (["compare"], "folder"),
    (["label", "--kind", "returns"], "folder"), (["train-head", "--labels", "x"], "folder"),
    (["train-value", "--labels", "x"], "folder"), (["theory"], "folder"),
    (["fit"], "file"), (["lookahead-fit"], "file"), (["judge", "--labels", "x", "--source", "lookahead:fit"], "file"),
])
def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, command, kind):
    (tmp_path / "file.txt").write_text("someone's notes")
    (tmp_path / "folder.json").mkdir()
    model = [] if command[0] == "theory" else ["--model", _no_model(tmp_path)]
    wrong = {"folder": ("file.txt", "must be a folder, but"), "file": ("folder.json", "must name a file, but")}[kind]
    assert main([*command, *model, "--out", str(tmp_path / wrong[0])]) == 2
    assert f"`--out` {wrong[1]} {str(tmp_path / wrong[0])!r} is a" in capsys.readouterr().err
    assert main([*command, *model, "--out", str(tmp_path / "file.txt" / "inner.json")]) == 2
    assert "lies inside" in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "someone's notes"


def test_fit_and_scaling_refuse_their_out_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("notes")
    head = tmp_path / "head"
    head.mkdir()
    code = main(["fit", "--model", _no_model(tmp_path), "--objective", "log-loss", "--head", str(head),
                 "--out", str(tmp_path / "file.txt")])  # the copy of the head would have failed after the fit
    assert code == 2 and "`--out` must be a folder" in capsys.readouterr().err
    # scaling: every model named checked before the first is measured, and the sizes too
    models_module = importlib.import_module("calibrated_sampling.models")
    loaded = []
    monkeypatch.setattr(models_module, "load_model", lambda name, **k: loaded.append(name))
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "config.json").write_text("{}")
    both = ["scaling", "--models", f"{tmp_path / 'm1'},{tmp_path / 'm2'}"]
    assert main([*both, "--out", str(tmp_path / "s")]) == 2
    assert "`model` path does not exist" in capsys.readouterr().err and loaded == []
    two = ["scaling", "--models", f"{tmp_path / 'm1'},{tmp_path / 'm1'}"]
    assert main([*two, "--params", "135M,-1", "--out", str(tmp_path / "s")]) == 2
    assert "`--params` must hold positive sizes, but is '135M,-1'" in capsys.readouterr().err
    assert main([*two, "--out", str(tmp_path / "file.txt")]) == 2
    assert "`--out` must be a folder" in capsys.readouterr().err and loaded == []


def test_a_device_the_machine_lacks_and_a_model_that_is_a_file_are_named(tmp_path, capsys):
    for device, message in (("cuda:99", "`device` is 'cuda:99', but this machine has"),
                            ("gpu", "`device` must be cpu, cuda, cuda:N or mps, but is 'gpu'")):
        code = main(["measure", "--model", _no_model(tmp_path), "--device", device, "--samplers", "base",
                     "--out", str(tmp_path / "o")])  # torch's own: an AssertionError traceback after the weights load
        assert code == 2 and message in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a model")
    code = main(["measure", "--model", str(tmp_path / "notes.txt"), "--samplers", "base", "--out", str(tmp_path / "o")])
    assert code == 2 and "`model` " + repr(str(tmp_path / "notes.txt")) + " is a file" in capsys.readouterr().err


def test_an_unreachable_hub_id_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    models_module = importlib.import_module("calibrated_sampling.models")

    def offline(name, **kwargs):
        raise OSError(f"`model` {name!r} is not a built-in alias, an existing path, or a hub id that can be reached")

    monkeypatch.setattr(models_module, "load_model", offline)
    code = main(["measure", "--model", "someone/model", "--samplers", "base", "--out", str(tmp_path / "o")])
    assert code == 2 and "error: `model` 'someone/model' is not" in capsys.readouterr().err


def test_an_empty_data_spec_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unrelated.txt").write_text("Some prose.\n\nMore prose.")
    for spec in ("", "  "):
        with pytest.raises(ValueError, match=f"`data` must name a corpus, file, folder or glob, but is {spec!r}"):
            load_documents(spec)


def test_generate_refuses_a_prompt_of_no_tokens(tmp_path, capsys):
    from test_calibrator import SCHEDULE

    from calibrated_sampling.models import load_model

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    model, tok = load_model(str(tmp_path / "model"), device="cpu")
    make_head(model, tok, calibration=SCHEDULE).save_pretrained(tmp_path / "head")
    code = main(["generate", "--model", str(tmp_path / "model"), "--device", "cpu", "--head", str(tmp_path / "head"),
                 "--prompt", ""])  # was a RuntimeError traceback from inside the model
    assert code == 2 and "`--prompt` '' has no tokens for this tokenizer" in capsys.readouterr().err


# --- training flags, damaged label manifests and checkpoints ---------------------------------------------

@pytest.mark.parametrize("command", ["train-head", "train-value"])
@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "`--lr` must be a positive finite number, but is nan"),
    ("--lr", "inf", "`--lr` must be a positive finite number, but is inf"),  # train-value ran on it, to NaN weights
    ("--lr", "0", "`--lr` must be a positive finite number, but is 0.0"),
    ("--td-lambda", "2", "`--td-lambda` must be in [0, 1], but is 2.0"),  # named `lam` after the model loaded
    ("--val-fraction", "nan", "`--val-fraction` must be in [0, 1], but is nan"),
    ("--batch-size", "0", "`--batch-size` must be at least 1, but is 0"),
    ("--td-n", "0", "`--td-n` must be at least 1, but is 0"),
])
def test_training_flags_are_checked_before_the_model_loads(tmp_path, capsys, command, flag, value, message):
    code = main([command, "--model", _no_model(tmp_path), "--labels", str(tmp_path / "labels"), flag, value,
                 "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_damaged_label_manifest_is_named(tmp_path):
    from calibrated_sampling.label_store import MANIFEST, read_manifest

    (tmp_path / MANIFEST).write_text('{"format": "calibrated-sam')
    with pytest.raises(ValueError, match=f"{MANIFEST} is not valid JSON"):  # was a bare "Unterminated string"
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(ValueError, match="is not a calibrated-sampling label manifest"):
        read_manifest(tmp_path)


def test_a_head_source_of_a_missing_folder_is_named(tmp_path):
    from calibrated_sampling.lookahead_value_fit import spec_source

    with pytest.raises(FileNotFoundError, match="head folder .*no-such-head has no config.json"):
        spec_source(f"head:{tmp_path / 'no-such-head'}:alpha=fit:top=2", make_model())


@pytest.mark.parametrize("source, message", [
    ("lookahed:alpha=fit", "`--source` must be a lookahead:, lookahead-value:, lookahead2: or head: spec"),
    ("lookahead:alpha=fit:temperature=0.9", "takes no temperature"),
    ("lookahead2:alpha=fit:top3=2", "unknown term 'top3=2'"),
    ("head:MISSING:alpha=fit", "head folder .*missing has no config.json"),
    ("lookahead-value:MISSING:alpha=fit", "missing has no config.json"),
])
def test_lookahead_fit_and_judge_check_their_source_before_the_model_loads(tmp_path, capsys, source, message):
    source = source.replace("MISSING", str(tmp_path / "missing"))
    for command in (["lookahead-fit", "--source", source], ["judge", "--labels", "x", "--source", source]):
        assert main([*command, "--model", _no_model(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "missing-model" not in err, err


@pytest.mark.parametrize("name", ["state.json", "head.safetensors", "optimizer.pt"])
def test_a_damaged_checkpoint_is_named_not_used(tmp_path, name):
    from test_train import make_head as make_train_head
    from test_train import synthetic_rows

    from calibrated_sampling.train import train_head

    model = make_model()
    rows = synthetic_rows(model, contexts=4)
    settings = dict(epochs=1, batch_size=8, lr=1e-3, checkpoint_every=2, progress=False, out_dir=tmp_path)
    train_head(make_train_head(model), rows, **settings)
    newest = max((tmp_path / "checkpoints").iterdir())
    damaged = newest / name
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"checkpoint .*{newest.name} is damaged: {name} cannot be read"):
        train_head(make_train_head(model), rows, **settings)
    with pytest.raises(ValueError, match="`lr` must be a positive finite number, but is inf"):
        train_head(make_train_head(model), rows, **{**settings, "lr": math.inf})


def test_theory_and_corpus_exponent_name_their_flags(tmp_path, capsys):
    from calibrated_sampling.data import split_of

    for vocab in ("0", "-5"):  # were "Geometric sequence cannot include zero" and a NaN cast
        assert main(["theory", "--vocab-size", vocab]) == 2
        assert f"`vocab_size` must be at least 3, but is {vocab}" in capsys.readouterr().err
    assert main(["theory", "--ms", "1.5,20", "--vocab-size", "1000", "--trials", "2"]) == 2  # 1.5 ran as 1
    assert "`--ms` must hold whole numbers of tokens, but is '1.5,20'" in capsys.readouterr().err
    assert main(["theory", "--seed", "-1"]) == 2  # was numpy's "expected non-negative integer"
    assert "`--seed` must be 0 or more, but is -1" in capsys.readouterr().err
    code = main(["label", "--model", _no_model(tmp_path), "--kind", "returns", "--seed", "-1", "--out", str(tmp_path)])
    assert code == 2 and "`--seed` must be 0 or more, but is -1" in capsys.readouterr().err  # before the model
    text = tmp_path / "one.txt"
    text.write_text("Some prose about the weather and other things.")
    other = {"fit": "eval", "eval": "fit"}[split_of(load_documents(str(text))[0].key)]
    assert main(["corpus-exponent", "--data", str(text), "--split", other]) == 2
    assert f"has no documents on the {other!r} side of the split" in capsys.readouterr().err
    one_word = tmp_path / "same.txt"
    one_word.write_text("tea " * 50)  # was "`texts` must contain ...": an argument the user never typed
    assert main(["corpus-exponent", "--data", str(one_word), "--split", "all"]) == 2
    assert f"`--data` {str(one_word)!r} must contain at least two distinct words" in capsys.readouterr().err


def test_a_lookahead_of_more_candidates_than_the_vocabulary_is_refused():
    model = make_model()  # was torch.topk's "selected index k out of range" at the first generated token
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"`top` {vocab + 1} is more candidates than the model's vocabulary"):
        parse_sampler(f"lookahead:alpha=0.1:top={vocab + 1}", model)
