"""Schedule files: round trip, refusals (another model, tokenizer, head, T; malformed fields), the
head-less calibrator of a per-step temperature schedule, and the ``schedule:FILE`` sampler."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import LogitsProcessorList

from calibrated_sampling.calibrator import FutureEntropyCalibrator
from calibrated_sampling.data import Window
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.measure import measure
from calibrated_sampling.models import prepare_tokenizer
from calibrated_sampling.samplers import ModelRequired, parse_sampler
from calibrated_sampling.schedule import Schedule, load_schedule, save_schedule, schedule_sampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

STEPS = 8


@pytest.fixture
def lm():
    model, tokenizer = make_model(), make_tokenizer(with_pad=True)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def make_head_dir(model, tokenizer, folder, seed=0):
    config = HeadConfig.for_model(model, tokenizer, mlp_hidden=16, lm_parameters=None, max_horizon=STEPS)
    head = FutureEntropyHead(config, model.get_output_embeddings().weight)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    head.save_pretrained(folder)
    return folder


def fit_result(a=(1.2, 1.1), b=(0.0, 0.0), future=None, converged=True) -> dict:
    """What fit_entropy_matched returns, reduced to what a schedule keeps."""
    return {"objective": "entropy", "form": "untied", "max_new_tokens": STEPS, "bin_size": 4, "a": list(a),
            "b": list(b), "future": future or {"kind": "none"},
            "report": {"converged": converged, "rounds": 3, "bins": [{"bin": 0, "gap": 0.01, "gap_stderr": 0.02},
                                                                     {"bin": 1, "gap": -0.01, "gap_stderr": 0.03}]}}


def test_round_trip_without_future(lm, tmp_path):
    model, tokenizer = lm
    path = save_schedule(tmp_path / "s.json", fit_result(), model, tokenizer)
    schedule = load_schedule(path, model, tokenizer, max_new_tokens=STEPS)
    assert schedule.a == (1.2, 1.1) and schedule.b == (0.0, 0.0) and schedule.future == {"kind": "none"}
    assert schedule.report["rounds"] == 3 and schedule.model["base_model"] == "tiny-random-llama"
    assert Schedule.from_dict(schedule.to_dict()).calibration() == schedule.calibration()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_round_trip_with_a_head_stores_a_relative_path(lm, tmp_path):
    model, tokenizer = lm
    head_dir = make_head_dir(model, tokenizer, tmp_path / "head")
    from calibrated_sampling.heads import weights_file_digest

    future = {"kind": "head", "path": str(head_dir), "sha256": weights_file_digest(head_dir)}
    path = save_schedule(tmp_path / "schedules" / "s.json", fit_result(b=(0.05, 0.02), future=future), model, tokenizer)
    assert json.loads(path.read_text())["future"]["path"] == "../head"
    schedule = load_schedule(path, model, tokenizer)
    assert schedule.head_dir().resolve() == head_dir.resolve()
    assert len(path.read_bytes()) < 8000  # a small file: the head's weights stay in the head folder


def test_a_fit_that_did_not_converge_is_not_written(lm, tmp_path):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="did not converge"):
        save_schedule(tmp_path / "s.json", fit_result(converged=False), model, tokenizer)
    assert not (tmp_path / "s.json").exists()


def test_refuses_another_model_tokenizer_length(lm, tmp_path):
    model, tokenizer = lm
    path = save_schedule(tmp_path / "s.json", fit_result(), model, tokenizer)
    with pytest.raises(ValueError, match="another model.*weights"):
        load_schedule(path, make_model(seed=1))
    record = json.loads(path.read_text())
    record["model"]["tokenizer_fingerprint"] = "0" * 16
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="tokenizer_fingerprint"):
        load_schedule(path, model, tokenizer)
    load_schedule(path, model)  # without the tokenizer only the model is checked
    with pytest.raises(ValueError, match="max_new_tokens = 8, but `max_new_tokens` is 16"):
        load_schedule(path, max_new_tokens=16)


def test_refuses_a_retrained_head(lm, tmp_path):
    model, tokenizer = lm
    head_dir = make_head_dir(model, tokenizer, tmp_path / "head")
    from calibrated_sampling.heads import weights_file_digest

    future = {"kind": "head", "path": str(head_dir), "sha256": weights_file_digest(head_dir)}
    path = save_schedule(tmp_path / "s.json", fit_result(b=(0.05, 0.0), future=future), model, tokenizer)
    make_head_dir(model, tokenizer, head_dir, seed=1)  # retrained in place
    with pytest.raises(ValueError, match="another head"):
        load_schedule(path, model)


@pytest.mark.parametrize("field, value, match", [
    ("a", [1.0], "ceil"),
    ("b", [0.1, 0.0], "every b = 0"),
    ("future", {"kind": "oracle"}, "kind"),
    ("future", {"kind": "lookahead", "top": 0}, "top"),
    ("future", {"kind": "head", "path": "x"}, "sha256"),
    ("model", {"base_model": "x"}, "exactly the keys"),
    ("format_version", 2, "version 2"),
    ("format", "something", "not a calibrated-sampling schedule"),
])
def test_malformed_fields_are_named(lm, tmp_path, field, value, match):
    model, tokenizer = lm
    path = save_schedule(tmp_path / "s.json", fit_result(), model, tokenizer)
    record = json.loads(path.read_text())
    record[field] = value
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=match):
        load_schedule(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_schedule(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------------
# Sampling a schedule


def test_headless_calibrator_applies_each_bins_a(lm):
    model, tokenizer = lm
    calibration = {"form": "untied", "max_new_tokens": 6, "bin_size": 2, "a": [1.5, 0.7, 2.0], "b": [0, 0, 0]}
    calibrator = FutureEntropyCalibrator(None, calibration)
    ids = torch.tensor([[5, 6, 7, 8]])
    with calibrator.attached(model), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             logits_processor=LogitsProcessorList([calibrator]), output_scores=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    for t, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        expected = calibration["a"][t // 2] * torch.log_softmax(logits.float(), -1)
        torch.testing.assert_close(scores, expected)


def test_headless_calibrator_refuses_weights_on_f():
    with pytest.raises(ValueError, match="every b"):
        FutureEntropyCalibrator(None, {"form": "untied", "max_new_tokens": 4, "bin_size": 4, "a": [1.0], "b": [0.1]})
    with pytest.raises(ValueError, match="`calibration` is required"):
        FutureEntropyCalibrator(None)
    with pytest.raises(ValueError, match="tied head"):
        FutureEntropyCalibrator(None, {"form": "untied", "max_new_tokens": 4, "bin_size": 4, "a": [1.0], "b": [0]},
                                fused=True)


def windows(count: int = 4) -> list[Window]:
    g = torch.Generator().manual_seed(0)
    return [Window(tuple(torch.randint(3, 99, (5,), generator=g).tolist()),
                   tuple(torch.randint(3, 99, (STEPS,), generator=g).tolist()), f"d{i}", "eval") for i in range(count)]


def test_a_constant_schedule_samples_as_temperature(lm, tmp_path):
    model, tokenizer = lm
    path = save_schedule(tmp_path / "s.json", fit_result(a=(1.25, 1.25)), model, tokenizer)
    sampler = schedule_sampler(f"schedule:{path}", model)
    assert sampler.spec == f"schedule:{path}" and sampler.key.startswith("schedule:") and ":sha256=" in sampler.key
    assert parse_sampler(sampler.key, model).key == sampler.key  # a key is a spec of itself
    results = measure(model, tokenizer, windows(), [sampler, "temperature=0.8"], batch_size=4, progress=False)
    ours, theirs = results[f"schedule:{path}"], results["temperature=0.8"]
    assert ours["log_loss"] == pytest.approx(theirs["log_loss"], abs=1e-5)
    assert ours["gen_entropy"] == pytest.approx(theirs["gen_entropy"], abs=1e-4)


def test_schedule_sampler_with_a_head(lm, tmp_path):
    model, tokenizer = lm
    head_dir = make_head_dir(model, tokenizer, tmp_path / "head")
    from calibrated_sampling.heads import weights_file_digest

    future = {"kind": "head", "path": str(head_dir), "sha256": weights_file_digest(head_dir)}
    path = save_schedule(tmp_path / "s.json", fit_result(b=(0.05, 0.02), future=future), model, tokenizer)
    sampler = schedule_sampler(f"schedule:{path}:past=base", model)
    assert sampler.calibrator.past_schedule == "base" and sampler.calibrator.head is not None
    result = measure(model, tokenizer, windows(2), [sampler], batch_size=2, progress=False)[sampler.spec]
    assert math.isfinite(result["log_loss"])


def test_schedule_spec_errors(lm, tmp_path):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="names no schedule file"):
        schedule_sampler("schedule:", model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        schedule_sampler(f"schedule:{tmp_path / 'x.json'}", model)
    path = save_schedule(tmp_path / "s.json", fit_result(), model, tokenizer)
    with pytest.raises(ModelRequired):  # the file is checked before the model is needed
        parse_sampler(f"schedule:{path}", None)
    with pytest.raises(ValueError, match="`past`"):
        schedule_sampler(f"schedule:{path}:past=later", model)
    with pytest.raises(ValueError, match="refitted or replaced"):
        schedule_sampler(f"schedule:{path}:sha256=0123456789abcdef", model)


def test_lookahead_future_keeps_the_candidates_and_gives_the_rest_their_mean():
    from calibrated_sampling.lookahead_schedule import lookahead_future

    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]), -1)
    candidates, values = torch.tensor([[0, 2]]), torch.tensor([[1.5, 0.5]])
    full = lookahead_future(logp, candidates, values)
    p0, p2 = logp[0, 0].exp(), logp[0, 2].exp()
    mean = (p0 * 1.5 + p2 * 0.5) / (p0 + p2)
    assert full[0, 0] == 1.5 and full[0, 2] == 0.5
    assert torch.allclose(full[0, [1, 3, 4]], mean.expand(3))


def test_lookahead_schedule_is_exact_with_every_token_a_candidate(lm, tmp_path):
    """With C = V the schedule's q is exp(a log p - b H(p(. | x, v))) over the whole vocabulary: checked
    against a brute-force next-step entropy per token; the sampler generates; steps past T are refused."""
    from calibrated_sampling.lookahead_schedule import ScheduledLookaheadProcessor
    from calibrated_sampling.schedule import schedule_calibrator

    model, tokenizer = lm
    vocab = model.get_output_embeddings().weight.shape[0]
    future = {"kind": "lookahead", "top": vocab}
    path = save_schedule(tmp_path / "look.json", fit_result(a=(0.9, 1.1), b=(0.3, -0.2), future=future), model,
                         tokenizer)
    processor = schedule_calibrator(load_schedule(path, model, tokenizer), model)
    assert isinstance(processor, ScheduledLookaheadProcessor) and processor.max_new_tokens == STEPS
    context = torch.tensor([[5, 9, 17, 4]])
    with torch.no_grad():
        logp = torch.log_softmax(model(context).logits[:, -1].float(), -1)
        extended = torch.cat([context.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        after = torch.log_softmax(model(extended).logits[:, -1].float(), -1)
    brute = -(after.exp() * after).sum(-1)  # H(p(. | x, v)) for every v
    for step, (a, b) in ((0, (0.9, 0.3)), (5, (1.1, -0.2))):
        got = processor.scheduled_logits(context, model(context).logits[:, -1].detach(), step)
        expected = a * logp - b * brute[None]
        assert torch.allclose(got - got.logsumexp(-1, keepdim=True), expected - expected.logsumexp(-1, keepdim=True),
                              atol=1e-4)
    with pytest.raises(ValueError, match="past the fitted schedule"):
        processor.scheduled_logits(context, logp, STEPS)
    prompt = torch.tensor([[5, 9, 17]])
    with processor.attached(model), torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=STEPS,
                             top_k=0, pad_token_id=0, logits_processor=LogitsProcessorList([processor]))
    assert out.shape[1] <= 3 + STEPS
    with pytest.raises(ValueError, match="only `past_schedule`"):
        schedule_calibrator(load_schedule(path), model, fused=True)
    sampler = schedule_sampler(f"schedule:{path}:past=base", model)
    assert sampler.fitted_length == STEPS and sampler.processors[0].past_schedule == "base"
    with pytest.raises(ValueError, match="vocabulary"):
        sampler.teacher_forced_logits(context, torch.zeros(1, vocab + 1), None, 0)
