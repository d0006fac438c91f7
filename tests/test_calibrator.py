"""FutureEntropyCalibrator: the formula, step bookkeeping, hooks, fused path, generate / pipeline / measure."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import LogitsProcessorList, TemperatureLogitsWarper, pipeline

from calibrated_sampling.calibrator import (
    CalibratedSampler,
    FutureEntropyCalibrator,
    check_calibration,
    constant_calibration,
    schedule_weights,
)
from calibrated_sampling.data import Window
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.measure import measure
from calibrated_sampling.samplers import parse_sampler, processors_key

SCHEDULE = {"form": "untied", "max_new_tokens": 8, "bin_size": 3, "a": [1.2, 0.9, 1.05], "b": [0.05, 0.02, 0.1]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make_head(model, tokenizer=None, family="tied", seed=0, calibration=None) -> FutureEntropyHead:
    """A small head with random non-zero weights, so that F depends on h, k and v."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    config = HeadConfig.for_model(model, tokenizer, family=family, mlp_hidden=16, lm_parameters=None,
                                  calibration=calibration)
    head = FutureEntropyHead(config, model.get_output_embeddings().weight)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    return model, tok, make_head(model, tok)


def prompts(tok, texts=("w1 w2 w3 w4 w5", "w6")):
    return tok(list(texts), return_tensors="pt", padding=True)


def generate(model, cal, enc, **kwargs):
    kwargs = {"max_new_tokens": 6, "do_sample": False, **kwargs}
    with torch.no_grad():
        return model.generate(**enc, logits_processor=LogitsProcessorList([cal]), **kwargs)


def greedy_scores(model, cal, enc, steps=6):
    out = generate(model, cal, enc, max_new_tokens=steps, return_dict_in_generate=True, output_scores=True,
                   output_logits=True)
    return out, torch.stack(out.scores, 1), torch.stack(out.logits, 1)  # (B, T, V)


# --------------------------------------------------------------------------------------------------
# The schedule


def test_schedule_weights_bins_and_errors():
    assert schedule_weights(SCHEDULE, 0) == (1.2, 0.05)
    assert schedule_weights(SCHEDULE, 5) == (0.9, 0.02)
    assert schedule_weights(SCHEDULE, 7) == (1.05, 0.1)  # the last bin is short: ceil(8 / 3) = 3 bins
    with pytest.raises(ValueError, match="`step` 8 is past the fitted schedule"):
        schedule_weights(SCHEDULE, 8)
    with pytest.raises(ValueError, match="`step` must be a non-negative integer, but is -1"):
        schedule_weights(SCHEDULE, -1)
    for broken, message in [({**SCHEDULE, "a": [1.0, 1.0]}, "`a` must be a list of ceil"),
                            ({**SCHEDULE, "b": [0.1, float("nan"), 0.1]}, "`b` must hold finite numbers"),
                            ({**SCHEDULE, "form": "per-step"}, "`form` must be one of"),
                            ({**SCHEDULE, "bin_size": 0}, "`bin_size` must be a positive integer, but is 0"),
                            ({k: v for k, v in SCHEDULE.items() if k != "a"}, "lacks 'a'")]:
        with pytest.raises(ValueError, match=message):
            check_calibration(broken)
    assert constant_calibration(1.1, 0.2, 5)["a"] == [1.1]


# --------------------------------------------------------------------------------------------------
# The formula


def test_hand_computed_distribution():
    """F_k(v) = k (s + c_v) with the MLP's output fixed: q ∝ p^a 2^-c for b k = ln 2."""
    model = make_model(vocab=5)
    head = FutureEntropyHead(HeadConfig(hidden_size=32, vocab_size=5, mlp_hidden=8))
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.zero_()
        head.set_rate(0.7)  # s: a per-row constant, drops out of q
        head.token_bias.copy_(torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]))  # c
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    ids = torch.tensor([[1, 3, 4]])
    for a, expected in [(1.0, p * torch.tensor([1, 0.5, 0.25, 1, 0.5])),
                        (2.0, p**2 * torch.tensor([1, 0.5, 0.25, 1, 0.5]))]:
        k = 2  # step 0 of a 3-token schedule: horizon T - 1 - t = 2
        cal = FutureEntropyCalibrator(head, constant_calibration(a, math.log(2) / k, 3))
        with cal.attached(model), torch.no_grad():
            model(ids)  # the forward pass whose hidden state the calibrator reads
            direct = cal(ids, p.log())
            listed = LogitsProcessorList([cal])(ids, p.log())
        torch.testing.assert_close(direct.softmax(-1), expected / expected.sum())
        torch.testing.assert_close(listed, direct)


def test_scores_not_edited_in_place_and_masks_stay(setup):
    model, tok, head = setup
    enc = prompts(tok)
    for a in (1.2, 0.0, -0.5):  # a <= 0 would turn -inf into nan or +inf without the mask
        cal = FutureEntropyCalibrator(head, constant_calibration(a, 0.1, 8))
        with cal.attached(model), torch.no_grad():
            scores = model(**enc).logits[:, -1]
            scores[:, 10:20] = float("-inf")  # another processor's mask
            before = scores.clone()
            out = cal(enc["input_ids"], scores)
        torch.testing.assert_close(scores, before)
        assert torch.isneginf(out[:, 10:20]).all() and torch.isfinite(out[:, :10]).all()


def test_scale_zero_is_the_temperature_part(setup):
    model, tok, head = setup
    enc = prompts(tok)
    cal = FutureEntropyCalibrator(head, SCHEDULE, scale=0.0, fused=False)  # output_logits stay the raw ones
    with cal.attached(model):
        _, scores, logits = greedy_scores(model, cal, enc)
    a = torch.tensor([schedule_weights(SCHEDULE, t)[0] for t in range(6)])[None, :, None]
    torch.testing.assert_close(scores.log_softmax(-1), (a * logits.log_softmax(-1)).log_softmax(-1))


def test_step_bookkeeping_across_generate_calls(setup):
    """b = 0 and a different a per step: q_t = p^(a_t), so the scores show which step each call used."""
    model, tok, head = setup
    schedule = {"form": "untied", "max_new_tokens": 6, "bin_size": 1, "a": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
                "b": [0.0] * 6}
    a = torch.tensor(schedule["a"])[None, :, None]
    batches = [("w1 w2 w3",), ("w4 w5 w6 w7 w8 w9 w10", "w3"), ("w2",)]
    plain = []  # greedy tokens do not change under p -> p^a, so the plain run has the same contexts
    for texts in batches:
        out = model.generate(**prompts(tok, texts), max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        plain.append(torch.stack(out.logits, 1).log_softmax(-1))
    for fused in (False, True):
        cal = FutureEntropyCalibrator(head, schedule, fused=fused)
        with cal.attached(model):
            for texts, logp in zip(batches, plain):
                out = model.generate(**prompts(tok, texts), max_new_tokens=6, do_sample=False,
                                     return_dict_in_generate=True, output_scores=True,
                                     logits_processor=LogitsProcessorList([cal]))
                scores = torch.stack(out.scores, 1)
                torch.testing.assert_close(scores.log_softmax(-1), (a * logp).log_softmax(-1), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# Fused path, batches, dtypes


def test_fused_equals_exact(setup):
    model, tok, head = setup
    enc = prompts(tok)
    with FutureEntropyCalibrator(head, SCHEDULE, fused=False).attached(model) as exact:
        out_exact, s_exact, _ = greedy_scores(model, exact, enc, steps=8)
    with FutureEntropyCalibrator(head, SCHEDULE, fused=True).attached(model) as fused:
        out_fused, s_fused, _ = greedy_scores(model, fused, enc, steps=8)
    assert torch.equal(out_exact.sequences, out_fused.sequences)
    torch.testing.assert_close(s_fused.log_softmax(-1), s_exact.log_softmax(-1), atol=2e-4, rtol=0)
    # The default chooses the fused path for a tied head once it has seen the model's own logits.
    auto = FutureEntropyCalibrator(head, SCHEDULE)
    with auto.attached(model):
        _, s_auto, _ = greedy_scores(model, auto, enc, steps=8)
        assert auto._fused_verified
    torch.testing.assert_close(s_auto.log_softmax(-1), s_exact.log_softmax(-1), atol=2e-4, rtol=0)


def test_a_fixed_horizon_head_is_read_at_its_horizon_at_every_step(tiny):
    """A head trained at one horizon (the distilled one-step head) gets k = fixed_horizon, fused or not."""
    model, tok = tiny
    head = make_head(model, tok)
    fixed = make_head(model, tok)
    fixed.config.fixed_horizon = 1
    enc = prompts(tok, ["w1 w2 w3 w4 w5"])  # no padding: the hidden states below need no mask
    for fused in (False, True):
        with FutureEntropyCalibrator(fixed, SCHEDULE, fused=fused).attached(model) as cal:
            out, scores, _ = greedy_scores(model, cal, enc, steps=8)  # (fused: the logits are h' 's)
        with torch.no_grad():
            plain = model(out.sequences, output_hidden_states=True)
        for t in (0, 4, 7):
            a, b = schedule_weights(SCHEDULE, t)
            position = out.sequences.shape[1] - 8 + t - 1
            expected = (a * torch.log_softmax(plain.logits[:, position].float(), -1)
                        - b * head(plain.hidden_states[-1][:, position], torch.tensor(1)).float())
            torch.testing.assert_close(scores[:, t].log_softmax(-1), expected.log_softmax(-1), atol=2e-4, rtol=0)


def test_batch_equals_one_at_a_time(setup):
    model, tok, head = setup
    texts = ("w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10")
    cal = FutureEntropyCalibrator(head, SCHEDULE)
    with cal.attached(model):
        out, batched, _ = greedy_scores(model, cal, prompts(tok, texts))
        for i, text in enumerate(texts):
            single_out, single, _ = greedy_scores(model, cal, prompts(tok, [text]))
            assert torch.equal(out.sequences[i, -6:], single_out.sequences[0, -6:])
            torch.testing.assert_close(batched[i].log_softmax(-1), single[0].log_softmax(-1), atol=1e-4, rtol=0)


def test_bf16_runs_and_returns_the_scores_dtype(setup):
    model, tok, head = setup
    model = model.to(torch.bfloat16)
    for fused in (None, False):
        cal = FutureEntropyCalibrator(head, SCHEDULE, fused=fused)
        with cal.attached(model):
            out, scores, _ = greedy_scores(model, cal, prompts(tok))
            assert torch.isfinite(scores).all() and out.sequences.shape == (2, 11)
            with torch.no_grad():
                logits = model(**prompts(tok)).logits[:, -1]
            assert cal(prompts(tok)["input_ids"], logits).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Hooks and errors


def test_detach_restores_the_model(setup):
    model, tok, head = setup
    enc = prompts(tok)
    out_layer = model.get_output_embeddings()
    with torch.no_grad():
        before = model(**enc).logits
    cal = FutureEntropyCalibrator(head, SCHEDULE, fused=True)
    handle = cal.attach(model)
    generate(model, cal, enc, do_sample=True)
    with torch.no_grad():
        assert not torch.allclose(model(**enc).logits[:, -1], before[:, -1])  # fused: h' replaced h
    handle.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before, atol=0, rtol=0)
    assert not (model._forward_pre_hooks or model._forward_hooks or out_layer._forward_pre_hooks
                or out_layer._forward_hooks)
    with pytest.raises(RuntimeError, match="not attached"):
        cal(enc["input_ids"], before[:, -1])


def test_errors(setup):
    model, tok, head = setup
    enc = prompts(tok)
    cal = FutureEntropyCalibrator(head, SCHEDULE)
    with pytest.raises(RuntimeError, match="not attached to a model"):
        generate(model, cal, enc)
    other = make_model(vocab=101)
    with pytest.raises(ValueError, match="trained for another model.*`vocab_size`: head 99, model 101"):
        cal.attach(other)
    with cal.attached(model):
        with pytest.raises(RuntimeError, match="already attached"):
            cal.attach(model)
        with torch.no_grad():
            scores = model(**enc).logits[:, -1]
        scores[0, 3] = float("nan")
        with pytest.raises(ValueError, match="contain NaN"):
            cal(enc["input_ids"], scores)
        with pytest.raises(RuntimeError, match="do not match the attached model's latest forward"):
            cal(enc["input_ids"][:, 1:], scores)
        with pytest.raises(ValueError, match="step 8 is past the fitted schedule of max_new_tokens = 8"):
            generate(model, cal, enc, max_new_tokens=9)
    with FutureEntropyCalibrator(head, SCHEDULE, fused=True).attached(model) as fused:
        with pytest.raises(ValueError, match="fused calibration needs the model's own logits"):
            generate(model, fused, enc, num_beams=2)  # beam search hands processors log-probabilities
        with pytest.raises(RuntimeError, match="generate\\(\\) did not call it"), torch.no_grad():
            model.generate(**enc, max_new_tokens=3, do_sample=False)  # attached, but not in the processor list
    with pytest.raises(ValueError, match="has no fitted calibration"):
        FutureEntropyCalibrator(head)
    with pytest.raises(ValueError, match="`past_schedule` must be one of error, base, but is 'last'"):
        FutureEntropyCalibrator(head, SCHEDULE, past_schedule="last")
    with pytest.raises(ValueError, match="`fused`=True needs a tied head"):
        FutureEntropyCalibrator(make_head(model, tok, family="lowrank"), SCHEDULE, fused=True)


def test_past_schedule_base_samples_from_the_base_model(setup):
    model, tok, head = setup
    cal = FutureEntropyCalibrator(head, SCHEDULE, past_schedule="base")
    with cal.attached(model):
        _, scores, logits = greedy_scores(model, cal, prompts(tok), steps=11)
    assert torch.equal(scores[:, 8:], logits[:, 8:])
    assert not torch.allclose(scores[:, :8].log_softmax(-1), logits[:, :8].log_softmax(-1))


def test_from_pretrained_checks_and_calibration(setup, tmp_path):
    model, tok, head = setup
    head.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="has no fitted calibration"):
        FutureEntropyCalibrator.from_pretrained(tmp_path / "bare", model, tok)
    cal = FutureEntropyCalibrator.from_pretrained(tmp_path / "bare", model, tok, a=1.1, b=0.1, max_new_tokens=4)
    assert cal.max_new_tokens == 4 and schedule_weights(cal.calibration, 3) == (1.1, 0.1)
    head.config.calibration = SCHEDULE
    head.save_pretrained(tmp_path / "fitted")
    cal = FutureEntropyCalibrator.from_pretrained(tmp_path / "fitted", model, tok, scale=0.5)
    assert cal.calibration == SCHEDULE and cal.scale == 0.5
    other_tok = make_tokenizer()
    other_tok.add_tokens(["extra"])
    with pytest.raises(ValueError, match="`tokenizer_fingerprint`"):
        FutureEntropyCalibrator.from_pretrained(tmp_path / "fitted", model, other_tok)


# --------------------------------------------------------------------------------------------------
# generate() features, pipeline, measure


def test_generate_beam_search_return_sequences_and_warpers(setup):
    model, tok, head = setup
    enc = prompts(tok)
    cal = FutureEntropyCalibrator(head, SCHEDULE)
    with cal.attached(model):
        assert generate(model, cal, enc, num_beams=3, num_return_sequences=2).shape == (4, 11)
        torch.manual_seed(0)
        assert generate(model, cal, enc, do_sample=True, num_return_sequences=3).shape == (6, 11)
        out = generate(model, cal, enc, do_sample=True, temperature=0.7, top_p=0.5, return_dict_in_generate=True,
                       output_scores=True)
        assert torch.isneginf(out.scores[0]).any()  # top-p ran after the calibrator
        # The same q as the calibrator followed by a temperature warper, step for step.
        torch.manual_seed(1)
        plain = generate(model, cal, enc, do_sample=True, temperature=0.7)
        torch.manual_seed(1)
        with torch.no_grad():
            listed = model.generate(**enc, max_new_tokens=6, do_sample=True,
                                    logits_processor=LogitsProcessorList([cal, TemperatureLogitsWarper(0.7)]))
        assert torch.equal(plain, listed)


def test_pipeline_with_left_padded_batches(setup):
    model, tok, head = setup
    cal = FutureEntropyCalibrator(head, SCHEDULE)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    with cal.attached(model):
        out = generator(["w1 w2 w3 w4", "w5", "w6 w7"], batch_size=2, max_new_tokens=5, do_sample=True,
                        logits_processor=LogitsProcessorList([cal]))
    assert len(out) == 3 and all(row[0]["generated_text"] for row in out)


def windows(n, prompt_lengths, steps, seed=0):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 99, (prompt_lengths[i % len(prompt_lengths)] + steps,), generator=rng).tolist()
        out.append(Window(tuple(ids[:-steps]), tuple(ids[-steps:]), f"doc{i}", "test"))
    return out


def direct_calibrated_log_loss(model, head, window, calibration):
    """-log q_t(human token), q_t ∝ exp(a_t log p - b_t F_{T-1-t}), from one plain forward pass."""
    ids = torch.tensor([window.prompt_ids + window.continuation_ids])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        P, T = len(window.prompt_ids), calibration["max_new_tokens"]
        losses = []
        for t, token in enumerate(window.continuation_ids):
            a, b = schedule_weights(calibration, t)
            h, logits = out.hidden_states[-1][0, P + t - 1], out.logits[0, P + t - 1]
            q = a * logits.log_softmax(-1) - b * head(h, torch.tensor(T - 1 - t))
            losses.append(-q.log_softmax(-1)[token])
    return torch.stack(losses)


def test_measure_calibrated_sampler(setup, tmp_path):
    model, tok, head = setup
    head.config.calibration = SCHEDULE
    head.save_pretrained(tmp_path / "fitted")
    head.config.calibration = constant_calibration(1.0, 0.0, 8)
    head.save_pretrained(tmp_path / "identity")
    spec = f"calibrated:{tmp_path / 'fitted'}"
    sampler = parse_sampler(spec + ":scale=0.5", model)
    assert isinstance(sampler, CalibratedSampler) and sampler.calibrator.scale == 0.5
    with pytest.raises(ValueError, match="`scale` needs a float, but is 'big'"):
        parse_sampler(spec + ":scale=big", model)
    # The key (what journals and label folders record): every option and a digest of the head's files,
    # which differ between heads; the bare processor list names the same q.
    assert sampler.key.startswith(f"calibrated:{tmp_path / 'fitted'}:scale=0.5:fused=auto:past=error:sha256=")
    assert processors_key(sampler.processors) == sampler.key
    assert sampler.key != parse_sampler(f"calibrated:{tmp_path / 'identity'}:scale=0.5", model).key

    data = windows(3, [6, 9, 4], 7)
    results = measure(model, tok, data, ["base", spec, f"calibrated:{tmp_path / 'identity'}"], batch_size=3,
                      progress=False)
    direct = torch.cat([direct_calibrated_log_loss(model, head, w, SCHEDULE) for w in data])
    assert results[spec]["log_loss"] == pytest.approx(direct.mean().item(), abs=1e-5)
    assert results[f"calibrated:{tmp_path / 'identity'}"]["log_loss"] == pytest.approx(
        results["base"]["log_loss"], abs=1e-6)
    assert abs(results[spec]["log_loss"] - results["base"]["log_loss"]) > 1e-3
    assert math.isfinite(results[spec]["gen_entropy"])
    # One-step windows: the generation's first q is the teacher-forced one (same prompt, same step).
    first = measure(model, tok, windows(3, [6, 9, 4], 1), [spec], batch_size=3, progress=False)[spec]
    assert first["gen_entropy"] == pytest.approx(first["human_entropy"], abs=1e-4)


def test_the_fixed_weight_form_tilts_by_a_one_horizon_heads_F_as_the_lookahead_does(setup, tmp_path):
    """calibrated:DIR:alpha=A:temperature=T samples q ∝ exp((log p - A F_k) / T) at every step, k the head's
    fixed horizon, with no fitted calibration needed; what it cannot mean is refused by name."""
    model, tok, head = setup
    head.config.fixed_horizon = 1
    head.save_pretrained(tmp_path / "one-step")  # no calibration in its config: alpha needs none
    spec = f"calibrated:{tmp_path / 'one-step'}:alpha=0.3:temperature=0.8"
    key = parse_sampler(spec, model).key
    assert key.startswith(f"calibrated:{tmp_path / 'one-step'}:scale=1:fused=auto:past=error:sha256=")
    assert key.endswith(":alpha=0.3:temperature=0.8")
    data = windows(3, [6, 9, 4], 7)
    results = measure(model, tok, data, ["base", spec, f"calibrated:{tmp_path / 'one-step'}:alpha=0"],
                      batch_size=3, progress=False)
    losses = []
    for window in data:
        ids = torch.tensor([window.prompt_ids + window.continuation_ids])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            for t, token in enumerate(window.continuation_ids):
                position = len(window.prompt_ids) + t - 1
                log_p = out.logits[0, position].log_softmax(-1)
                q = (log_p - 0.3 * head(out.hidden_states[-1][0, position], torch.tensor(1))) / 0.8
                losses.append(-q.log_softmax(-1)[token])
    assert results[spec]["log_loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    assert results[f"calibrated:{tmp_path / 'one-step'}:alpha=0"]["log_loss"] == pytest.approx(
        results["base"]["log_loss"], abs=1e-6)
    for bad, words in ((":temperature=0.8", "`temperature` is for the fixed-weight form"),
                       (":alpha=0.3:temperature=0", "`temperature` must be above 0"),
                       (":alpha=0.3:scale=2", "`scale` multiplies a fitted schedule's b"),
                       (":alpha=nan", "alpha")):
        with pytest.raises(ValueError, match=words):
            parse_sampler(f"calibrated:{tmp_path / 'one-step'}{bad}", model)
    head.config.fixed_horizon = None  # a head that reads k = T - 1 - t: a fixed weight gives no T
    head.save_pretrained(tmp_path / "all-horizons")
    with pytest.raises(ValueError, match="alpha=A needs a head trained at one horizon"):
        parse_sampler(f"calibrated:{tmp_path / 'all-horizons'}:alpha=0.3", model)


def test_comparison_journal_measures_a_refitted_head_again(setup, tmp_path):
    from calibrated_sampling.compare import Comparison
    from calibrated_sampling.journal import Journal

    model, tok, head = setup
    head.config.calibration = SCHEDULE
    head.save_pretrained(tmp_path / "head")
    spec = f"calibrated:{tmp_path / 'head'}"

    def measured_now(spec):
        runner = Comparison(model, tok, windows(3, [6, 9], 8), batch_size=3, log=lambda line: None,
                            journal=Journal(tmp_path / "journal.jsonl", "run"))
        before = len(runner.journal.entries)
        runner.run("base", "grid"), runner.run(spec, "calibrated")
        return len(runner.journal.entries) - before

    assert measured_now(spec) == 2
    assert measured_now(spec) == 0  # both from the journal
    head.config.calibration = {**SCHEDULE, "b": [0.0, 0.0, 0.3]}  # a refit: same folder, other weights
    head.save_pretrained(tmp_path / "head")
    assert measured_now(spec) == 1  # the head again, base still from the journal


def test_cli_generate(tmp_path, capsys):
    from calibrated_sampling.cli import main
    from calibrated_sampling.models import load_model

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    model, tok = load_model(str(tmp_path / "model"), device="cpu")
    head = make_head(model, tok)
    head.save_pretrained(tmp_path / "bare")
    head.config.calibration = SCHEDULE
    head.save_pretrained(tmp_path / "fitted")
    common = ["generate", "--model", str(tmp_path / "model"), "--device", "cpu", "--prompt", "w1 w2"]
    assert main([*common, "--head", str(tmp_path / "fitted"), "--max-new-tokens", "5", "--scale", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2")
    assert main([*common, "--head", str(tmp_path / "bare")]) == 2
    assert "has no fitted calibration" in capsys.readouterr().err
    assert main([*common, "--head", str(tmp_path / "fitted"), "--max-new-tokens", "9"]) == 2
    assert "longer than the fitted schedule" in capsys.readouterr().err
