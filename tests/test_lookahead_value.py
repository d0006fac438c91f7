"""Lookahead F beyond one step: lookahead-value (H + V after each candidate) and the exact two-step F,
checked against the model run on context + v (+ w) directly; their processors, specs and alpha fits."""

import math

import pytest
import torch
from conftest import VOCAB, make_model
from test_compare import model_windows
from test_value import random_value

from calibrated_sampling.lookahead import LookaheadEntropy, lookahead_logits
from calibrated_sampling.lookahead_fit import fit_alpha, lookahead_log_loss, lookahead_loss_terms
from calibrated_sampling.lookahead_value import (
    FutureLookaheadProcessor,
    TwoStepLookahead,
    ValueLookahead,
)
from calibrated_sampling.lookahead_value_fit import (
    check_source,
    fit_alpha_bins,
    fit_spec_alpha,
    per_step_alphas,
    spec_source,
    with_alpha,
)
from calibrated_sampling.measure import measure, teacher_forced
from calibrated_sampling.metrics import entropy
from calibrated_sampling.samplers import ModelRequired, check_specs, parse_sampler
from calibrated_sampling.value import StateValueHead

CONTEXTS = [[5, 17, 42, 8, 60], [11, 23, 3, 71, 9, 30, 64, 12]]  # two lengths: the left padding must be masked


def padded(contexts):
    """Left-padded ids (B, L) and mask (B, L)."""
    length = max(map(len, contexts))
    ids = torch.tensor([[0] * (length - len(c)) + c for c in contexts])
    mask = torch.tensor([[0] * (length - len(c)) + [1] * len(c) for c in contexts])
    return ids, mask


@torch.no_grad()
def last_logits(model, contexts):
    return torch.stack([model(torch.tensor([c])).logits[0, -1].float() for c in contexts])  # (B, V)


@torch.no_grad()
def after(model, sequences):
    """For each sequence: the logits (N, L, V) and the input of the output embedding (N, L, H), no cache."""
    hidden = model.get_decoder()(input_ids=torch.tensor(sequences)).last_hidden_state
    return model.get_output_embeddings()(hidden).float(), hidden


def test_value_lookahead_is_next_entropy_plus_value_after_the_candidate(tiny, one_thread):
    model, tok = tiny
    value = random_value(model, tok)
    ids, mask = padded(CONTEXTS)
    logits = last_logits(model, CONTEXTS)
    source = ValueLookahead(model, value, top=6, horizon=9)
    candidates, future = source(ids, logits, mask)
    for b, context in enumerate(CONTEXTS):
        assert torch.equal(candidates[b], logits[b].topk(6).indices)
        out, hidden = after(model, [[*context, v] for v in candidates[b].tolist()])
        expected = entropy(out[:, -1]) + value(hidden[:, -1], 8)  # H(p(. | x, v)) + V_8(h(x, v))
        torch.testing.assert_close(future[b], expected, atol=1e-4, rtol=0)
    # K = 1: V_0 = 0, the one-step lookahead.
    one = ValueLookahead(model, value, top=6, horizon=1)(ids, logits, mask)[1]
    torch.testing.assert_close(one, LookaheadEntropy(model, 6)(ids, logits, mask)[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="`horizon` must be at most the value head's max_horizon"):
        ValueLookahead(model, value, top=6, horizon=14)


def brute_force_two_step(model, context, top, top2):
    """F2 of the top ``top`` candidates by running every context + v + w (the top ``top2`` w of each)."""
    logp = torch.log_softmax(last_logits(model, [context])[0], -1)
    candidates = logp.topk(top).indices.tolist()
    first, _ = after(model, [[*context, v] for v in candidates])
    logp_v = torch.log_softmax(first[:, -1], -1)  # (C, V)
    f2 = []
    for j, v in enumerate(candidates):
        p_w, w = logp_v[j].exp().topk(top2)
        second, _ = after(model, [[*context, v, u] for u in w.tolist()])
        f2.append(entropy(first[j, -1]) + (p_w / p_w.sum() * entropy(second[:, -1])).sum())
    return torch.tensor(candidates), torch.stack(f2)


@pytest.mark.parametrize("top, top2", [(VOCAB, VOCAB), (4, 3)])
def test_two_step_equals_brute_force(tiny, one_thread, top, top2):
    """With C = C2 = V the expectation is over every continuation: F2 exactly as defined; with small C, C2
    the renormalised top-C2 expectation. chunk_tokens forces several second passes per call."""
    model, _ = tiny
    ids, mask = padded(CONTEXTS)
    source = TwoStepLookahead(model, top=top, top2=top2, chunk_tokens=700)
    candidates, f2 = source(ids, last_logits(model, CONTEXTS), mask)
    assert source.cache.get_seq_length() == ids.shape[1]  # the candidates and continuations are cropped again
    for b, context in enumerate(CONTEXTS):
        expected_candidates, expected = brute_force_two_step(model, context, top, top2)
        assert torch.equal(candidates[b], expected_candidates)
        torch.testing.assert_close(f2[b], expected, atol=1e-4, rtol=0)
    if top2 == VOCAB:
        torch.testing.assert_close(source.covered, torch.ones_like(source.covered), atol=1e-5, rtol=0)


def test_sampler_q_is_the_formula_and_generation_runs(tiny, one_thread):
    model, tok = tiny
    sampler = parse_sampler("lookahead2:alpha=0.7:top=3:top2=4", model)
    assert sampler.hooks_model and not sampler.truncating
    windows = model_windows(model, 2, 5, 3, temperature=1.0)
    with sampler.attach(model):
        out = teacher_forced(model, sampler, windows, pad_id=0)
    for i, w in enumerate(windows):
        for t in range(3):
            context = [*w.prompt_ids, *w.continuation_ids[:t]]
            logp = torch.log_softmax(last_logits(model, [context]), -1)
            candidates, f2 = brute_force_two_step(model, context, 3, 4)
            log_q = lookahead_logits(logp, candidates[None], f2[None], 0.7)[0]
            assert out["log_loss"][i, t].item() == pytest.approx(-log_q[w.continuation_ids[t]].item(), abs=1e-4)
    result = measure(model, tok, windows, ["lookahead2:alpha=0.7:top=3:top2=4"], batch_size=2, progress=False)
    assert math.isfinite(result["lookahead2:alpha=0.7:top=3:top2=4"]["gen_entropy"])
    # With a temperature of its own, q^(1/T) renormalised: the knob that reads the two-step F at EntCE = 0.
    tempered = parse_sampler("lookahead2:alpha=0.7:top=3:top2=4:temperature=0.8", model)
    assert tempered.key == "lookahead2:alpha=0.7:top=3:top2=4:temperature=0.8"
    with tempered.attach(model):
        cooled = teacher_forced(model, tempered, windows, pad_id=0)
    context = list(windows[0].prompt_ids)
    candidates, f2 = brute_force_two_step(model, context, 3, 4)
    logp = torch.log_softmax(last_logits(model, [context]), -1)
    log_q = torch.log_softmax(lookahead_logits(logp, candidates[None], f2[None], 0.7)[0] / 0.8, -1)
    assert cooled["log_loss"][0, 0].item() == pytest.approx(-log_q[windows[0].continuation_ids[0]].item(), abs=1e-4)


def test_per_step_alpha_follows_the_step(tiny):
    model, _ = tiny
    source = LookaheadEntropy(model, 5)
    processor = FutureLookaheadProcessor(source, [0.0, 2.0, -1.0])
    ids = torch.tensor([[5, 6, 7]])
    scores = last_logits(model, [[5, 6, 7]])
    logp = torch.log_softmax(scores, -1)
    torch.testing.assert_close(processor(ids, scores), logp)  # step 0: alpha 0, q = p
    assert (processor.step, processor.alpha) == (0, 0.0)
    for t, extended in enumerate(([5, 6, 7, 8], [5, 6, 7, 8, 9]), start=1):
        processor(torch.tensor([extended]), last_logits(model, [extended]))
        assert (processor.step, processor.alpha) == (t, [0.0, 2.0, -1.0][t])
    with pytest.raises(ValueError, match="generation step 3 is past the 3 per-step weights"):
        processor(torch.tensor([[5, 6, 7, 8, 9, 10]]), last_logits(model, [[5, 6, 7, 8, 9, 10]]))
    processor(torch.tensor([[40, 41]]), last_logits(model, [[40, 41]]))  # a new context starts at step 0
    assert processor.step == 0
    with pytest.raises(ValueError, match="`alpha` must be a finite number or a non-empty sequence"):
        FutureLookaheadProcessor(source, [0.1, math.nan])


def test_spec_keys(tiny, tmp_path):
    model, tok = tiny
    random_value(model, tok).save_pretrained(tmp_path / "v")
    folder = str(tmp_path / "v")
    two = parse_sampler("lookahead2:alpha=0.10", model)
    assert two.key == "lookahead2:alpha=0.1:top=8:top2=8"  # T = 1 unspelled: older journals' keys still resume
    assert parse_sampler("lookahead2:alpha=0.1:temperature=1", model).key == two.key
    keys = {parse_sampler(spec, model).key for spec in (
        "lookahead2:alpha=0.1", "lookahead2:alpha=0.1:top=4", "lookahead2:alpha=0.1:top2=4", "lookahead2:alpha=0.2")}
    assert len(keys) == 4
    value = parse_sampler(f"lookahead-value:{folder}:alpha=0.5:top=4", model)
    assert value.hooks_model
    assert value.key.startswith(f"lookahead-value:{folder}:alpha=0.5:top=4:horizon=12:sha256=")
    for sampler in (two, value):
        assert parse_sampler(sampler.key, model).key == sampler.key  # a key is a spec of itself
    others = {parse_sampler(f"lookahead-value:{folder}:alpha=0.5:top=4:horizon={k}", model).key for k in (1, 2)}
    assert len(others | {value.key}) == 3
    # A temperature of its own: spelled at the end of the key where it is not 1, q^(1/T) renormalised.
    assert parse_sampler(f"lookahead-value:{folder}:alpha=0.5:top=4:temperature=1", model).key == value.key
    tempered = parse_sampler(f"lookahead-value:{folder}:alpha=0.5:top=4:temperature=0.8", model)
    assert tempered.key == f"{value.key}:temperature=0.8"
    assert parse_sampler(tempered.key, model).key == tempered.key
    windows = model_windows(model, 1, 5, 1, temperature=1.0)
    with tempered.attach(model):
        cooled = teacher_forced(model, tempered, windows, pad_id=0)
    context = list(windows[0].prompt_ids)
    ids, mask = padded([context])
    logits = last_logits(model, [context])
    candidates, future = ValueLookahead(model, StateValueHead.from_pretrained(folder, model), 4, 12)(ids, logits, mask)
    log_q = torch.log_softmax(lookahead_logits(torch.log_softmax(logits, -1), candidates, future, 0.5)[0] / 0.8, -1)
    assert cooled["log_loss"][0, 0].item() == pytest.approx(-log_q[windows[0].continuation_ids[0]].item(), abs=1e-4)
    with pytest.raises(ModelRequired):
        parse_sampler(f"lookahead-value:{folder}:alpha=0.5")
    check_specs([f"lookahead-value:{folder}:alpha=0.5", "lookahead2:alpha=0.5"])
    for spec, message in (("lookahead2:alpha=nan", "`alpha` must be a finite number"),
                          ("lookahead2:alpha=0.1:top=0", "`top` must be a positive integer"),
                          ("lookahead2:alpha=0.1:beta=1", "unknown term 'beta=1'"),
                          ("lookahead2:top=3", "sets no alpha"),
                          ("lookahead2:alpha=fit", "alpha=fit needs data"),
                          ("lookahead2:alpha=0.1:temperature=0", "`temperature` must be above 0"),
                          ("lookahead2:alpha=fit:temperature=0.9", "alpha=fit .* takes no temperature"),
                          ("lookahead2:alpha=0.1:alpha=0.2", "sets `alpha` twice"),
                          (f"lookahead-value:{folder}:alpha=0.1:sha256=0123456789abcdef", "pins value files sha256"),
                          ("lookahead-value:alpha=0.1", "names no value folder"),
                          (f"lookahead-value:{folder}:alpha=fit:temperature=0.9", "alpha=fit .* takes no temperature"),
                          (f"lookahead-value:{folder}:alpha=0.1:temperature=-1", "`temperature` must be above 0")):
        with pytest.raises(ValueError, match=message):
            parse_sampler(spec, model)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        parse_sampler(f"lookahead-value:{tmp_path}:alpha=0.1", model)
    assert with_alpha("lookahead:fit:top=3", -0.25) == "lookahead:alpha=-0.25:top=3"
    # An F source is made from p itself, so a sampler's temperature in it is refused by the argument's name.
    for spec in ("lookahead:alpha=0.1:temperature=0.9", "lookahead2:alpha=0.1:temperature=0.9",
                 f"lookahead-value:{folder}:alpha=0.1:temperature=0.9"):
        with pytest.raises(ValueError, match=r"`source` .* sets a temperature, which an F source does not take"):
            check_source(spec, "source")
    check_source(f"lookahead-value:{folder}:alpha=fit", "source")


def test_alpha_fit_has_a_standard_error_and_a_minimum(tiny, tmp_path, one_thread):
    model, tok = tiny
    windows = model_windows(model, 6, 5, 8, temperature=0.8)
    terms = lookahead_loss_terms(model, tok, windows, batch_size=3, source=TwoStepLookahead(model, 4, 4))
    assert terms["window"].unique().tolist() == list(range(6)) and terms["step"].max().item() == 7
    fit = fit_alpha(terms)
    assert math.isfinite(fit["stderr"]) and fit["stderr"] > 0 and fit["clusters"] == 6
    assert math.isfinite(fit["stderr_model"]) and fit["stderr_model"] > 0
    for shift in (-0.05, 0.05):
        assert lookahead_log_loss(terms, fit["alpha"] + shift)[0] > fit["log_loss"]
    bins = fit_alpha_bins(terms, 4)
    assert [b["bin"] for b in bins] == [0, 1] and all(b["stderr"] > 0 for b in bins)
    assert per_step_alphas(bins, 4, 8) == [bins[0]["alpha"]] * 4 + [bins[1]["alpha"]] * 4
    random_value(model, tok).save_pretrained(tmp_path / "v")
    fitted = fit_spec_alpha(f"lookahead-value:{tmp_path / 'v'}:alpha=fit:top=4:horizon=3", model, tok, windows,
                            batch_size=3)
    assert fitted["spec"].startswith(f"lookahead-value:{tmp_path / 'v'}:alpha=") and fitted["stderr"] > 0
    assert parse_sampler(fitted["spec"], model).key == fitted["spec"]


def test_head_source_is_the_heads_f_on_the_teacher_forced_hidden_states(tiny, tmp_path, one_thread):
    from test_calibrator import make_head

    model, tok = tiny
    head = make_head(model, tok)
    head.save_pretrained(tmp_path / "h")
    windows = model_windows(model, 4, 5, 6, temperature=0.8)
    for horizon in (None, 2):
        spec = f"head:{tmp_path / 'h'}:alpha=fit:top=4" + ("" if horizon is None else f":horizon={horizon}")
        source = spec_source(spec, model)
        terms = lookahead_loss_terms(model, tok, windows, batch_size=3, source=source)
        # the same F by hand: the head on each step's last hidden state, at the top 4 of p
        ids = torch.tensor([w.prompt_ids + w.continuation_ids for w in windows])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        for t in range(6):
            position = len(windows[0].prompt_ids) + t - 1
            logp = torch.log_softmax(out.logits[:, position].float(), -1)
            top = logp.topk(4, -1).indices
            k = torch.full((4,), 6 - 1 - t if horizon is None else horizon)
            expected = head(out.hidden_states[-1][:, position], k).gather(-1, top)
            rows = terms["step"] == t
            assert torch.allclose(terms["entropy"][rows].float(), expected, atol=1e-4)
            assert torch.allclose(terms["logp"][rows].float(), logp.gather(-1, top), atol=1e-4)
    fit = fit_alpha(terms)
    assert math.isfinite(fit["alpha"]) and fit["stderr"] > 0
    fitted = fit_spec_alpha(f"head:{tmp_path / 'h'}:alpha=fit:top=4:horizon=2", model, tok, windows, batch_size=3)
    assert fitted["alpha"] == pytest.approx(fit["alpha"]) and fitted["spec"] == with_alpha(spec, fit["alpha"])
    with pytest.raises(TypeError, match="from_hidden"):
        source(ids, out.logits[:, -1])
    with pytest.raises(ValueError, match="pins head files sha256"):
        spec_source(f"head:{tmp_path / 'h'}:alpha=fit:sha256=0123456789abcdef", model)
    with pytest.raises(ValueError, match="names no folder"):
        spec_source("head:alpha=fit", model)
    with pytest.raises(ValueError, match=r"`vocab_size`: head 99, model 120"):
        spec_source(f"head:{tmp_path / 'h'}:alpha=fit", make_model(vocab=120))
