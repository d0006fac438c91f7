import json
import math

import pytest
import torch
from conftest import EOS_ID, VOCAB, make_model, make_tokenizer, word_text
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper

from calibrated_sampling import compare as compare_module
from calibrated_sampling.cli import main
from calibrated_sampling.compare import Comparison, Preset, find_root, reuse_decoder_pass, run_comparison
from calibrated_sampling.data import Window, batch_windows
from calibrated_sampling.equal_entropy import family
from calibrated_sampling.lookahead import parse_lookahead
from calibrated_sampling.lookahead_fit import (
    fit_alpha,
    human_gap,
    lookahead_log_loss,
    lookahead_loss_terms,
    token_log_loss_terms,
)
from calibrated_sampling.mauve import compute_mauve, text_features
from calibrated_sampling.measure import measure, teacher_forced
from calibrated_sampling.metrics import entropy
from calibrated_sampling.samplers import parse_sampler


def random_windows(n, prompt_lengths, steps, seed=0):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (prompt_lengths[i % len(prompt_lengths)] + steps,), generator=rng).tolist()
        cut = len(ids) - steps
        out.append(Window(tuple(ids[:cut]), tuple(ids[cut:]), f"doc{i}", "test"))
    return out


def model_windows(model, n, prompt_length, steps, temperature, seed=0):
    """Windows whose "human" continuations are sampled from the model at ``temperature`` (no EOS)."""
    prompts = [w.prompt_ids for w in random_windows(n, [prompt_length], 0, seed)]
    torch.manual_seed(seed)
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor([EOS_ID]), TemperatureLogitsWarper(temperature)])
    with torch.no_grad():
        out = model.generate(torch.tensor(prompts), attention_mask=torch.ones(n, prompt_length, dtype=torch.long),
                             do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=steps,
                             min_new_tokens=steps, logits_processor=processors, pad_token_id=0)
    return [Window(tuple(p), tuple(out[i, prompt_length:].tolist()), f"doc{i}", "test") for i, p in enumerate(prompts)]


# --- matched-entropy search --------------------------------------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
def test_find_root_converges_on_a_known_root(sign):
    calls = []

    def f(x):
        calls.append(x)
        return sign * (x ** 3 - 0.3)

    found = find_root(f, 0.0, 1.0, f(0.0), f(1.0), iterations=12, tol=1e-5, digits=6)
    assert found["x"] == pytest.approx(0.3 ** (1 / 3), abs=1e-3)
    assert found["converged"] and len(calls) <= 2 + 12
    with pytest.raises(ValueError, match="bracket"):
        find_root(f, 0.0, 0.1, f(0.0), f(0.1), iterations=3)


def test_find_root_on_a_log_scale():
    found = find_root(lambda x: -(math.log10(x) + 4), 1e-6, 0.1, 2.0, -3.0, iterations=8, tol=1e-3, log=True)
    assert found["x"] == pytest.approx(1e-4, rel=1e-2) and found["converged"]
    with pytest.raises(ValueError, match="positive bracket"):
        find_root(lambda x: x, 0.0, 1.0, -1.0, 1.0, iterations=2, log=True)


def test_matched_temperature_finds_the_temperature_the_text_came_from(tiny):
    model, tok = tiny
    windows = model_windows(model, 24, 6, 24, temperature=0.6)
    runner = Comparison(model, tok, windows, seed=0, batch_size=24, log=lambda line: None)
    found = runner.matched("temperature", lambda v: f"temperature={v:g}", {1.0: "base"}, (0.3, 2.0),
                           iterations=6, tol=0.02)
    assert found["bracketed"]
    assert abs(found["entce"]) < min(abs(f) for _, f in found["history"][:3]) + 1e-9
    assert found["value"] == pytest.approx(0.6, abs=0.12)
    assert found["measure_calls"] <= 2 + 6
    assert runner.results[found["spec"]]["roles"][-1] == "matched temperature"


# --- MAUVE ---------------------------------------------------------------------------------------------

def test_mauve_identical_sets_give_one_and_different_sets_less():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(200, 16, generator=gen)
    assert compute_mauve(p, p.clone())["mauve"] == pytest.approx(1.0, abs=1e-6)
    same_distribution = compute_mauve(p[:100], p[100:])["mauve"]
    shifted = p[100:].clone()
    shifted[:, 0] += 4.0
    different = compute_mauve(p[:100], shifted)["mauve"]
    assert same_distribution > 0.8
    assert different < 0.5 * same_distribution
    assert compute_mauve(p, p.clone(), seed=3)["num_clusters"] == 20


def test_text_features_are_mean_pooled_final_hidden_states(tiny):
    model, _ = tiny
    sequences = [[5, 6, 7], [8, 9], []]
    features = text_features(model, sequences, batch_size=2)
    with torch.no_grad():
        direct = model.get_decoder()(input_ids=torch.tensor([[8, 9]])).last_hidden_state[0].mean(0)
    torch.testing.assert_close(features[1], direct.double(), atol=1e-5, rtol=0)
    assert features[2].isnan().all() and not features[:2].isnan().any()


# --- lookahead -----------------------------------------------------------------------------------------

def formula_log_q(model, context, alpha, top):
    """log q over the vocabulary from the definition: forward passes of context + v for each candidate v."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), -1)
        candidates = logp.topk(top).indices
        h = torch.stack([entropy(model(torch.tensor([[*context, v]])).logits[0, -1]) for v in candidates.tolist()])
    weights = torch.softmax(logp[candidates] - alpha * h, -1) * logp[candidates].exp().sum()
    q = logp.exp().clone()
    q[candidates] = weights
    return q.log()


@pytest.mark.parametrize("top", [VOCAB, 7])
def test_lookahead_q_equals_the_formula(tiny, top):
    model, tok = tiny
    windows = random_windows(2, [5, 8], 3)  # different prompt lengths: the left padding must be masked
    sampler = parse_sampler(f"lookahead:alpha=0.4:top={top}", model)
    with sampler.attach(model):
        out = teacher_forced(model, sampler, windows, pad_id=0)
    for i, w in enumerate(windows):
        for t in range(3):
            log_q = formula_log_q(model, [*w.prompt_ids, *w.continuation_ids[:t]], 0.4, top)
            assert out["log_loss"][i, t].item() == pytest.approx(-log_q[w.continuation_ids[t]].item(), abs=1e-4)
            assert out["entropy"][i, t].item() == pytest.approx(-(log_q.exp() * log_q).sum().item(), abs=1e-4)


def test_lookahead_generation_samples_from_the_formula(tiny):
    """The distribution generate() samples from (recorded by measure) has the entropy of the formula's q."""
    model, tok = tiny
    windows = random_windows(1, [6], 4)
    spec = "lookahead:alpha=-0.3:top=9"
    # (stop_at_eos=False would mask EOS, which changes q: compare the steps before an EOS instead.)
    result = measure(model, tok, windows, [spec], batch_size=1, progress=False)[spec]
    generated = result["samples"][0]
    assert len(generated) >= 2
    for t in range(len(generated)):
        log_q = formula_log_q(model, [*windows[0].prompt_ids, *generated[:t]], -0.3, 9)
        expected = -(log_q.exp() * log_q).sum().item()
        assert result["per_step"]["gen_entropy"][t] == pytest.approx(expected, abs=1e-4)


def test_alpha_fit_lowers_human_log_loss(tiny):
    model, tok = tiny
    terms = lookahead_loss_terms(model, tok, model_windows(model, 6, 5, 10, temperature=0.8), top=12, batch_size=4)
    fit = fit_alpha(terms)
    assert fit["log_loss"] <= fit["log_loss_alpha0"] + 1e-12
    assert abs(lookahead_log_loss(terms, fit["alpha"])[1]) < 1e-5  # the derivative vanishes at the optimum
    grid = min(lookahead_log_loss(terms, a)[0] for a in torch.linspace(-3, 3, 121).tolist())
    assert fit["log_loss"] <= grid + 1e-9
    loss0 = lookahead_log_loss(terms, 0.0)[0]
    windows = model_windows(model, 6, 5, 10, temperature=0.8)
    direct = measure(model, tok, windows, ["base"], batch_size=6, progress=False)["base"]["log_loss"]
    assert loss0 == pytest.approx(direct, abs=1e-5)  # alpha = 0 is the base model


def test_human_gap_is_the_log_loss_slope_at_zero_per_covered_token(tiny):
    model, tok = tiny
    terms = lookahead_loss_terms(model, tok, model_windows(model, 6, 5, 10, temperature=0.8), top=12, batch_size=4)
    gap = human_gap(terms)
    eps = 1e-4
    slope = (lookahead_log_loss(terms, eps)[0] - lookahead_log_loss(terms, -eps)[0]) / (2 * eps)
    curvature = (lookahead_log_loss(terms, eps)[1] - lookahead_log_loss(terms, -eps)[1]) / (2 * eps)
    assert 0 < gap["in_top_fraction"] <= 1 and gap["gap_stderr"] > 0
    assert slope == pytest.approx(gap["in_top_fraction"] * gap["gap"], abs=1e-6)
    assert curvature == pytest.approx(gap["in_top_fraction"] * gap["spread"], rel=1e-3)
    # one token by hand: F at the human token minus F's mean under p over the candidates
    i = int((terms["index"] >= 0).nonzero()[0])
    p, f = terms["logp"][i].softmax(-1), terms["entropy"][i]
    first = token_log_loss_terms(terms, 0.0)[1][i]
    assert first.item() == pytest.approx((f[terms["index"][i]] - (p * f).sum()).item())
    # the standard error clusters by window: deviations summed within a window, then across the G windows
    inside = terms["index"] >= 0
    deviations = token_log_loss_terms(terms, 0.0)[1][inside] - gap["gap"]
    windows = terms["window"][inside]
    sums = torch.stack([deviations[windows == w].sum() for w in windows.unique()])
    g = len(sums)
    assert gap["gap_stderr"] == pytest.approx((g / (g - 1) * (sums ** 2).sum()).sqrt().item() / len(deviations))
    assert human_gap({**terms, "index": torch.full_like(terms["index"], -1)})["in_top_fraction"] == 0.0


def test_lookahead_with_a_temperature_samples_q_to_the_power_one_over_t(tiny):
    model, tok = tiny
    windows = random_windows(2, [5, 8], 3)
    sampler = parse_sampler("lookahead:alpha=0.4:top=7:temperature=0.8", model)
    assert sampler.key == "lookahead:alpha=0.4:top=7:temperature=0.8"
    with sampler.attach(model):
        out = teacher_forced(model, sampler, windows, pad_id=0)
    for i, w in enumerate(windows):
        for t in range(3):
            log_q = torch.log_softmax(formula_log_q(model, [*w.prompt_ids, *w.continuation_ids[:t]], 0.4, 7) / 0.8, -1)
            assert out["log_loss"][i, t].item() == pytest.approx(-log_q[w.continuation_ids[t]].item(), abs=1e-4)
            assert out["entropy"][i, t].item() == pytest.approx(-(log_q.exp() * log_q).sum().item(), abs=1e-4)


def test_lookahead_specs():
    assert parse_lookahead("lookahead:alpha=0.5:top=4") == {"alpha": 0.5, "top": 4, "temperature": 1.0}
    assert parse_lookahead("lookahead:fit") == {"alpha": "fit", "top": 16, "temperature": 1.0}
    # temperature 1 is the lookahead itself, under the key it had before the option existed
    assert parse_sampler("lookahead:alpha=0.5:temperature=1.0", make_model()).key == "lookahead:alpha=0.5:top=16"
    for bad in ("0", "-0.5", "inf"):
        with pytest.raises(ValueError, match="temperature"):
            parse_sampler(f"lookahead:alpha=0.5:temperature={bad}", make_model())
    with pytest.raises(ValueError, match="takes no temperature"):
        parse_lookahead("lookahead:fit:temperature=0.9")
    with pytest.raises(ValueError, match="needs data"):
        parse_sampler("lookahead:fit", make_model())
    with pytest.raises(ValueError, match="unknown term 'beta=1'"):
        parse_sampler("lookahead:beta=1", make_model())
    with pytest.raises(ValueError, match="`alpha` needs a float"):
        parse_sampler("lookahead:alpha=x", make_model())


# --- reuse of the decoder pass, and the comparison end to end ---------------------------------------------

def test_reused_decoder_pass_gives_identical_results(tiny):
    model, tok = tiny
    windows = random_windows(4, [5, 9], 6)
    specs = ["base", "top_p=0.9", "temperature=0.7"]
    plain = measure(model, tok, windows, specs, batch_size=2, progress=False)
    memo = {}
    with reuse_decoder_pass(model, memo):
        reused = measure(model, tok, windows, specs, batch_size=2, progress=False)
    assert len(memo) == 2  # one entry per batch, shared by the samplers
    assert "get_decoder" not in vars(model)
    for spec in specs:
        for key in ("log_loss_smoothed", "gen_entropy", "entce", "samples"):
            assert plain[spec][key] == reused[spec][key]
    assert batch_windows(windows, 0, True)[0].shape == (4, 15)


def _strip_timings(value):
    if isinstance(value, dict):
        return {k: _strip_timings(v) for k, v in value.items() if k not in ("seconds", "seconds_per_token", "machine")}
    if isinstance(value, list):
        return [_strip_timings(v) for v in value]
    return value


def test_cli_compare_end_to_end_and_deterministic(tmp_path, tiny_model, capsys):
    tok = make_tokenizer()
    tiny_model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "text").mkdir()
    for i in range(24):
        (tmp_path / "text" / f"{i}.txt").write_text(word_text(rng, 40))
    args = ["compare", "--quick", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "text"),
            "--num-prompts", "6", "--max-new-tokens", "8", "--prompt-tokens", "6", "--batch-size", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "Matched entropy" in printed and "frontier_logloss.png" in printed
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {"model", "data", "settings", "samplers", "matched"} <= set(results)
    # The lookahead's own temperature is searched too, from the lookahead itself (T = 1) and temperature's match.
    lookahead_knob, = set(results["matched"]) - {"temperature", "top_p", "min_p"}
    assert lookahead_knob == family(results["lookahead"]["spec"] + ":temperature=0.5")[0]
    tempered = results["matched"][lookahead_knob]
    history = dict(map(tuple, tempered["history"]))
    assert history[1.0] == results["samplers"][results["lookahead"]["spec"]]["entce"]
    temperature = results["matched"]["temperature"]
    assert round(temperature["value_at_zero"] or temperature["value"], 4) in history
    for end in tempered["bracket"] or []:
        assert end["spec"] in results["samplers"]
    assert lookahead_knob in results["equal_entropy"]["rows"]
    for name in ("base", "temperature=0.9", "top_p=0.95", "top_k=50", "min_p=0.05",
                 "eta=0.0009", "epsilon=0.0003"):
        r = results["samplers"][name]
        assert isinstance(r["entce"], float) and isinstance(r["self_bleu"], float) and "per_step" in r
        assert math.isfinite(r["mauve"]) and 0 <= r["mauve"] <= 1
    lookahead = results["lookahead"]
    assert lookahead["spec"] in results["samplers"] and lookahead["log_loss"] <= lookahead["log_loss_alpha0"]
    top_p = results["samplers"]["top_p=0.95"]
    assert top_p["truncating"] and (top_p["truncated_fraction"] == 0 or math.isinf(top_p["log_loss"]))
    for m in results["matched"].values():
        assert m["spec"] in results["samplers"] and {"entce", "log_loss", "distinct_2", "self_bleu"} <= set(m)
    for name in ("report.md", "samples.jsonl", "curves.png", "frontier_logloss.png", "frontier_diversity.png"):
        assert (tmp_path / "a" / name).stat().st_size > 500
    assert "smoothed" in (tmp_path / "a" / "report.md").read_text()
    # Same seed, same numbers.
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert json.dumps(_strip_timings(again), sort_keys=True) == json.dumps(_strip_timings(results), sort_keys=True)


def test_comparison_resumes_from_its_journal_and_refuses_another_ones(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    windows = random_windows(4, [5, 7], 6)
    preset = Preset(num_prompts=4, max_new_tokens=6, fit_prompts=0, search_iterations=1, lookahead_top=2,
                    batch_size=4, top_p=(), top_k=(), min_p=(), typical_p=(), eta=(), epsilon=())
    calls = []
    original = compare_module.measure
    monkeypatch.setattr(compare_module, "measure", lambda *a, **k: calls.append(a[3][0].spec) or original(*a, **k))
    journal = tmp_path / "measurements.jsonl"

    def run(seed=0):
        calls.clear()
        payload = run_comparison(model, tok, windows, None, preset, seed=seed, log=lambda line: None, journal=journal)
        return json.dumps(_strip_timings(payload["samplers"]), sort_keys=True)

    first = run()
    measured = list(calls)
    assert len(measured) >= 3 and len(journal.read_text().splitlines()) == 1 + len(measured)
    assert run() == first and calls == []  # everything from the journal, the same numbers
    # An interruption in the middle of writing the last line: that one measurement runs again.
    text = journal.read_text()
    journal.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    with pytest.warns(UserWarning, match="cut off"):
        assert run() == first
    assert calls == measured[-1:]
    with pytest.raises(ValueError, match="another comparison"):
        run(seed=1)
    # A damaged line elsewhere: moved aside, as it was, and measured again; the other entries stand.
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    with pytest.warns(UserWarning, match="line 2 is damaged"):
        assert run() == first
    assert calls == measured[:1]
    assert (tmp_path / "measurements.jsonl.damaged").read_text().splitlines()[-1] == lines[1][:20]


@pytest.mark.slow
def test_smollm2_lookahead_equals_the_formula(smollm):
    model, tok = smollm
    ids = tok("The quick brown fox jumps over the lazy dog. It was", add_special_tokens=False)["input_ids"]
    windows = [Window(tuple(ids[:-2]), tuple(ids[-2:]), "doc", "test")]
    sampler = parse_sampler("lookahead:alpha=0.3:top=4", model)
    with sampler.attach(model):
        out = teacher_forced(model, sampler, windows, pad_id=tok.pad_token_id)
    for t in range(2):
        log_q = formula_log_q(model, [*ids[:-2], *ids[len(ids) - 2:len(ids) - 2 + t]], 0.3, 4)
        assert out["log_loss"][0, t].item() == pytest.approx(-log_q[ids[len(ids) - 2 + t]].item(), abs=1e-3)


def test_journal_fingerprint_follows_what_the_numbers_depend_on(tiny):
    """A comparison whose grid changed resumes its journal (a measurement's numbers do not depend on which
    other settings are measured); another batch size, length or lookahead is another comparison. And
    typical_p is in no default grid: on a large vocabulary it keeps top-p's tokens (a second name)."""
    from dataclasses import replace

    from calibrated_sampling.compare import PRESETS, comparison_fingerprint
    from calibrated_sampling.data import Window

    model, tokenizer = tiny
    windows = [Window(prompt_ids=(1, 5, 6, 7), continuation_ids=(8, 9, 10), doc_key="d", source="test")]
    preset = PRESETS["quick"]
    same = comparison_fingerprint(model, tokenizer, windows, None, preset, 0)
    assert comparison_fingerprint(model, tokenizer, windows, None, replace(preset, temperature=(0.8, 0.9),
                                                                           typical_p=(0.5,)), 0) == same
    for change in ({"batch_size": 4}, {"lookahead_top": 3}, {"max_new_tokens": 40}):
        assert comparison_fingerprint(model, tokenizer, windows, None, replace(preset, **change), 0) != same
    assert all(not p.typical_p for p in PRESETS.values())
