"""The entropy-matched fit: the exact Markov-chain proof (per-step EntCE 0 with F = 0 and with exact F,
lower log loss with exact F), and the language-model pipeline on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from calibrated_sampling.data import Window
from calibrated_sampling.entropy_fit import fit_entropy_matched
from calibrated_sampling.entropy_markov import drift_example, markov_entropy_fit
from calibrated_sampling.fit import markov_measures
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.measure import measure
from calibrated_sampling.models import prepare_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

T = 16  # steps of the Markov chain's generations


@pytest.fixture(scope="module")
def chain():
    return drift_example()


@pytest.fixture(scope="module")
def markov_fits(chain):
    human, model, initial = chain
    return {future: markov_entropy_fit(human, model, initial, T, future=future) for future in ("none", "exact")}


def test_the_example_drifts_like_a_language_model(chain):
    """Generation entropy climbs along the model's own samples; the human log loss does not."""
    human, model, initial = chain
    base = markov_measures(human, model.expand(T, *model.shape), initial)
    gen, loss = base["gen_entropy"], base["log_loss"]
    assert gen[-4:].mean() - gen[:4].mean() > 0.15
    assert abs(loss[-4:].mean() - loss[4:8].mean()) < 0.02
    assert base["entce"] > 0.2


@pytest.mark.parametrize("future", ["none", "exact"])
def test_markov_fit_calibrates_every_step(markov_fits, future):
    fit = markov_fits[future]
    assert fit["converged"]
    measures = fit["measures"]  # an independent computation from the fitted chain
    assert (measures["gen_entropy"] - measures["log_loss"]).abs().max() < 1e-8


def test_exact_future_pays_in_log_loss(chain, markov_fits):
    """F removes entropy more cheaply than temperature: calibrated both ways, exact F has lower log loss."""
    human, model, initial = chain
    base = markov_measures(human, model.expand(T, *model.shape), initial)["log_loss"].mean()
    none, exact = markov_fits["none"], markov_fits["exact"]
    assert (none["b"] == 0).all()
    assert exact["log_loss"] < none["log_loss"] - 0.02
    assert exact["log_loss"] < base  # calibrated and better than the base model on human text
    assert exact["multiplier"] > 0


def test_multiplier_search_finds_the_best_multiplier_along_the_constraint(chain, markov_fits):
    """Fits with the multiplier held fixed, each exactly calibrated: none beats the searched one."""
    human, model, initial = chain
    searched = markov_fits["exact"]["log_loss"]
    for multiplier in (0.0, 0.5, 0.8, 1.2, 1.5):
        fixed = markov_entropy_fit(human, model, initial, T, future="exact", multipliers=multiplier)
        assert fixed["converged"]
        assert searched <= fixed["log_loss"] + 1e-6


def test_full_newton_reaches_the_same_schedule(chain, markov_fits):
    human, model, initial = chain
    full = markov_entropy_fit(human, model, initial, T, future="exact", newton="full")
    assert full["converged"] and full["rounds"] <= markov_fits["exact"]["rounds"]
    assert full["log_loss"] == pytest.approx(markov_fits["exact"]["log_loss"], abs=1e-5)


def test_markov_bins_calibrate_each_bin(chain):
    human, model, initial = chain
    fit = markov_entropy_fit(human, model, initial, T, bin_size=4, future="exact")
    measures = fit["measures"]
    per_bin = (measures["gen_entropy"] - measures["log_loss"]).reshape(4, 4).mean(1)
    assert fit["converged"] and per_bin.abs().max() < 1e-8 and len(fit["a"]) == 4


def test_markov_bad_arguments(chain):
    human, model, initial = chain
    with pytest.raises(ValueError, match="`future`"):
        markov_entropy_fit(human, model, initial, T, future="head")
    with pytest.raises(ValueError, match="`newton`"):
        markov_entropy_fit(human, model, initial, T, newton="secant")
    with pytest.raises(ValueError, match="`bin_size`"):
        markov_entropy_fit(human, model, initial, T, bin_size=0)


# ----------------------------------------------------------------------------------------------------
# The language-model pipeline

STEPS = 12


def sharper_text_windows(model, count: int, seed: int = 0) -> list[Window]:
    """Prompts of random words whose 'human' continuations the model writes at temperature 0.7: the human
    is sharper than the model, so the calibrating a is above 1 and reachable."""
    g = torch.Generator().manual_seed(seed)
    windows = []
    for i in range(count):
        prompt = torch.randint(3, 99, (5 + i % 3,), generator=g)
        torch.manual_seed(seed * 1000 + i)
        with torch.no_grad():
            out = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=True, temperature=0.7, top_k=0, max_new_tokens=STEPS,
                                 min_new_tokens=STEPS, pad_token_id=0)
        windows.append(Window(tuple(prompt.tolist()), tuple(out[0, len(prompt):].tolist()), f"doc{i}", "fit"))
    return windows


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = make_model(), make_tokenizer(with_pad=True)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer, sharper_text_windows(model, 12)


@pytest.fixture(scope="module")
def head_dir(lm, tmp_path_factory):
    model, tokenizer, _ = lm
    config = HeadConfig.for_model(model, tokenizer, mlp_hidden=16, lm_parameters=None, max_horizon=STEPS)
    head = FutureEntropyHead(config, model.get_output_embeddings().weight)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("head")
    head.save_pretrained(folder)
    return folder


def test_lm_fit_without_future_converges_to_a_cooler_schedule(lm):
    model, tokenizer, windows = lm
    fit = fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, batch_size=6,
                              max_rounds=8, progress=False)
    report = fit["report"]
    assert report["converged"] and 1 < report["rounds"] <= 8
    assert fit["future"] == {"kind": "none"} and fit["b"] == [0.0, 0.0, 0.0]
    assert all(a > 1 for a in fit["a"])  # the human text is sharper than the model
    for row in report["bins"]:
        assert abs(row["gap"]) <= row["gap_stderr"]
    assert 0 < report["generated_tokens"] <= report["rounds"] * len(windows) * STEPS
    assert report["history"][0]["a"] == [1.0, 1.0, 1.0]  # the first round measures the base model
    assert abs(report["history"][0]["entce"]) > abs(report["entce"])


def test_lm_fit_with_a_head(lm, head_dir):
    model, tokenizer, windows = lm
    fit = fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, batch_size=6,
                              max_rounds=8, future=str(head_dir), progress=False)
    assert fit["report"]["converged"]
    assert fit["future"]["kind"] == "head" and len(fit["future"]["sha256"]) == 64
    for row in fit["report"]["bins"]:
        assert abs(row["gap"]) <= row["gap_stderr"]


def test_lm_fit_with_the_lookahead(lm, tmp_path):
    """The third F: the exact one-step lookahead over the top C. Its generations at b = 0 are the per-step
    temperature schedule's (same seed: the lookahead's own passes draw no random numbers), the fit
    converges, and its schedule file samples through the schedule: spec."""
    from calibrated_sampling.entropy_fit import generation_sums
    from calibrated_sampling.schedule import load_schedule, save_schedule, schedule_sampler

    model, tokenizer, windows = lm
    a, b = torch.tensor([1.1, 1.0, 0.9], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    settings = {"max_new_tokens": STEPS, "bin_size": 4, "pad_id": 0, "batch_size": 6, "seed": 3}
    plain = generation_sums(model, None, windows, a, b, **settings)
    looked = generation_sums(model, None, windows, a, b, lookahead_top=4, **settings)
    assert torch.allclose(plain[..., :3], looked[..., :3], atol=1e-5)  # count, H(q), dH/da
    assert plain[..., 3].abs().max() == 0 and looked[..., 3].abs().max() > 0  # dH/db = Cov_q(F, s) now
    fit = fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, batch_size=6,
                              max_rounds=8, future=("lookahead", 4), progress=False)
    assert fit["report"]["converged"] and fit["future"] == {"kind": "lookahead", "top": 4}
    for row in fit["report"]["bins"]:
        assert abs(row["gap"]) <= row["gap_stderr"]
    path = save_schedule(tmp_path / "lookahead.json", fit, model, tokenizer)
    assert load_schedule(path, model, tokenizer).future == {"kind": "lookahead", "top": 4}
    sampler = schedule_sampler(f"schedule:{path}", model)
    result = measure(model, tokenizer, windows[:4], [sampler], batch_size=4, progress=False)[sampler.spec]
    assert math.isfinite(result["log_loss"]) and result["gen_entropy"] > 0


def test_lm_fit_with_a_fixed_f_weight_matches_only_a(lm):
    """--f-weight: F's weight stays where it was put, in every bin and round, and only the a_j are matched;
    --start: the first round samples the given a_j, and the base log loss is still the base model's."""
    model, tokenizer, windows = lm
    settings = dict(max_new_tokens=STEPS, bin_size=4, batch_size=6, max_rounds=8, progress=False)
    plain = fit_entropy_matched(model, tokenizer, windows, **settings)
    fixed = fit_entropy_matched(model, tokenizer, windows, future=("lookahead", 4), f_weight=3.0,
                                start_a=plain["a"], **settings)
    report = fixed["report"]
    assert report["converged"] and report["f_weight"] == 3.0 and fixed["b"] == [3.0, 3.0, 3.0]
    assert report["rounds"] > 1 and all(row["b"] == [3.0, 3.0, 3.0] for row in report["history"])
    assert report["history"][0]["a"] == pytest.approx(plain["a"])
    assert report["log_loss_base"] == pytest.approx(plain["report"]["log_loss_base"])
    assert report["log_loss_base"] == pytest.approx(plain["report"]["history"][0]["log_loss"])
    for row in report["bins"]:
        assert abs(row["gap"]) <= row["gap_stderr"]
    # F removes entropy, so the matched a_j are lower than the temperature schedule's (softer log p).
    assert sum(fixed["a"]) < sum(plain["a"])


def test_lm_fit_sizes_its_first_step_by_the_start_slope(lm):
    """start_slope: round 1's step uses the start's measured slope where it is steeper than the closed form,
    and only round 1's (round 2 on, the fit's own secant)."""
    model, tokenizer, windows = lm
    settings = dict(max_new_tokens=STEPS, bin_size=4, batch_size=6, progress=False)
    free = fit_entropy_matched(model, tokenizer, windows, max_rounds=2, **settings)["report"]["history"]
    steep = fit_entropy_matched(model, tokenizer, windows, max_rounds=2, start_slope=[-1e3, math.nan, -1e-6],
                                **settings)["report"]
    seeded = steep["history"]
    assert steep["start_slope"] == [-1e3, None, -1e-6]
    assert seeded[0]["gap"] == pytest.approx(free[0]["gap"])  # the same first round
    gap, a1, a2 = seeded[0]["gap"][0], seeded[0]["a"][0], seeded[1]["a"][0]
    assert a2 - a1 == pytest.approx(-gap / -1e3) and abs(free[1]["a"][0] - a1) > 10 * abs(a2 - a1)
    # Unknown (NaN) or shallower than the closed form: the closed-form step, as without a start slope.
    assert seeded[1]["a"][1:] == pytest.approx(free[1]["a"][1:])


def test_lm_fit_that_runs_out_of_rounds_says_so(lm):
    model, tokenizer, windows = lm
    fit = fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, batch_size=6,
                              max_rounds=1, progress=False)
    assert not fit["report"]["converged"] and fit["report"]["rounds"] == 1
    assert fit["a"] == [1.0, 1.0, 1.0]  # the measured schedule, never an unmeasured update


def test_lm_fit_bad_arguments(lm):
    model, tokenizer, windows = lm
    with pytest.raises(ValueError, match="`future`"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, future=3)
    with pytest.raises(ValueError, match="at least 2"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, future=("lookahead", 1))
    with pytest.raises(ValueError, match="`max_rounds`"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, max_rounds=0)
    with pytest.raises(ValueError, match="only"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS + 1)
    with pytest.raises(ValueError, match="`f_weight` 0.1 weights F, but the fit has none"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, f_weight=0.1)
    with pytest.raises(ValueError, match="`f_weight` must be a finite number of at least 0, but is -1"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, future=("lookahead", 4), f_weight=-1)
    with pytest.raises(ValueError, match=r"`start_a` must be 3 numbers \(one per bin\), each at least 0.05, but is \[1.0\]"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, start_a=[1.0])
    with pytest.raises(ValueError, match="`start_a` must be 3 numbers"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, start_a=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"`start_slope` must be 3 numbers \(one per bin\), each negative or NaN, "
                                         r"but is \[-1.0, 2.0, -1.0\]"):
        fit_entropy_matched(model, tokenizer, windows, max_new_tokens=STEPS, bin_size=4, start_slope=[-1.0, 2.0, -1.0])


def test_cli_fit_writes_a_schedule_that_measure_samples(tmp_path, capsys):
    """`fit` (entropy objective, the default) writes a schedule file; `measure` samples it by its spec;
    a fit that runs out of rounds exits 1 and writes nothing; bad flags fail before the model loads."""
    from conftest import word_text

    from calibrated_sampling.cli import main

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "text").mkdir()
    for i in range(16):
        (tmp_path / "text" / f"{i}.txt").write_text(word_text(rng, 60))
    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "text"), "--prompt-tokens", "8",
              "--max-new-tokens", "8", "--batch-size", "4"]
    schedule_file = tmp_path / "schedule.json"
    fit_args = ["fit", *common, "--num-prompts", "6", "--bin-size", "4", "--max-rounds", "12",
                "--out", str(schedule_file)]
    assert main(fit_args) == 0
    assert "F: none, T = 8, objective entropy" in capsys.readouterr().out
    record = json.loads(schedule_file.read_text())
    assert record["report"]["converged"] and len(record["a"]) == 2 and record["b"] == [0.0, 0.0]
    assert [p.name for p in tmp_path.glob("schedule.*")] == ["schedule.json"]  # its rounds and batches: gone
    assert main(["measure", *common, "--split", "fit", "--num-prompts", "6", "--samplers",
                 f"base,schedule:{schedule_file}", "--out", str(tmp_path / "measure")]) == 0
    results = json.loads((tmp_path / "measure" / "results.json").read_text())["samplers"]
    assert {"base", f"schedule:{schedule_file}"} <= set(results)
    capsys.readouterr()
    # `generate` samples the schedule; a --scale is a head's option, refused for a schedule.
    assert main(["generate", "--model", str(tmp_path / "model"), "--schedule", str(schedule_file),
                 "--prompt", "w1 w2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("w1 w2")
    assert main(["generate", "--model", str(tmp_path / "model"), "--schedule", str(schedule_file),
                 "--prompt", "w1", "--scale", "0.5"]) == 2
    assert "`--scale` 0.5 applies to --head only" in capsys.readouterr().err
    # One round cannot converge from the base model: exit 1, nothing written.
    assert main([*fit_args[:-2], "--max-rounds", "1", "--out", str(tmp_path / "none.json")]) == 1
    assert "did not converge" in capsys.readouterr().err and not (tmp_path / "none.json").exists()
    assert main([*fit_args[:-2], "--out", str(tmp_path / "folder")]) == 2  # a schedule is a .json file
    assert "`--out` must name a .json file" in capsys.readouterr().err
    assert main(["fit", *common, "--objective", "log-loss", "--out", str(tmp_path / "x.json")]) == 2
    assert "`--head` is required" in capsys.readouterr().err
    assert main([*fit_args, "--lookahead-top", "1"]) == 2
    assert "`--lookahead-top` must be at least 2 (with one candidate F is constant), but is 1" in capsys.readouterr().err
    assert main([*fit_args, "--lookahead-top", "4", "--objective", "log-loss", "--head", str(tmp_path)]) == 2
    assert "goes with --objective entropy and without --head" in capsys.readouterr().err
    assert main([*fit_args, "--f-weight", "0.1"]) == 2
    assert "`--f-weight` 0.1 weights F: give --head or --lookahead-top" in capsys.readouterr().err
    assert main([*fit_args, "--lookahead-top", "4", "--f-weight", "nan"]) == 2
    assert "`--f-weight` must be a finite number of at least 0, but is nan" in capsys.readouterr().err
    assert main([*fit_args, "--start", str(tmp_path / "missing.json")]) == 2
    assert "is not a schedule file" in capsys.readouterr().err
    # --start: another schedule's a_j start the rounds, refused where its bins differ.
    restarted = tmp_path / "restarted.json"
    assert main([*fit_args[:-2], "--start", str(schedule_file), "--out", str(restarted)]) == 0
    capsys.readouterr()
    report = json.loads(restarted.read_text())["report"]
    assert report["history"][0]["a"] == pytest.approx(record["a"])
    # ...and the start's own last two rounds give round 1's step its measured slope (NaN written as null).
    from calibrated_sampling.entropy_fit import secant_slope
    secant = secant_slope(record["report"]["history"]).tolist()
    assert report["start_slope"] == [None if math.isnan(x) else pytest.approx(x) for x in secant]
    assert main([*fit_args[:-2], "--bin-size", "8", "--start", str(schedule_file), "--out", str(tmp_path / "b.json")]) == 2
    assert "has 4-step bins, but `--bin-size` is 8" in capsys.readouterr().err
    # --f-weight with the lookahead's F: this near-uniform model needs a near its floor already (the temperature
    # schedule's a_j are 0.05-0.13), so a fixed weight leaves a bin short of entropy at the smallest a, which more
    # rounds cannot fix. The fit stops at once, says why, and writes nothing; its summary names the fixed weight.
    assert main([*fit_args[:-2], "--lookahead-top", "4", "--f-weight", "0.5", "--start", str(schedule_file),
                 "--out", str(tmp_path / "heavy.json")]) == 1
    out, err = capsys.readouterr()
    assert "F's weight fixed at 0.5" in out and "multiplier" not in out
    assert "the fit cannot converge: bin" in err and "F's weight 0.5 removes more" in err
    assert "round 3:" not in out and not (tmp_path / "heavy.json").exists()
    # A schedule is measured at its own length only.
    assert main(["measure", *common[:-4], "--max-new-tokens", "6", "--batch-size", "4", "--split", "fit",
                 "--num-prompts", "6", "--samplers", f"schedule:{schedule_file}",
                 "--out", str(tmp_path / "measure6")]) == 2
    assert "fitted for 8-token generations" in capsys.readouterr().err
    assert not (tmp_path / "measure6").exists()  # refused before its journal was written


def test_an_interrupted_fit_resumes_from_its_rounds(lm, tmp_path, monkeypatch):
    """A fit stopped after its first round (out of rounds) resumes at round 2 with the same result as an
    uninterrupted fit, sampling only the rounds it had not."""
    from calibrated_sampling import entropy_fit

    model, tok, windows = lm
    settings = dict(max_new_tokens=8, bin_size=4, batch_size=4, seed=0, progress=False)
    whole = fit_entropy_matched(model, tok, windows, max_rounds=3, **settings)
    checkpoint = tmp_path / "rounds.json"
    first = fit_entropy_matched(model, tok, windows, max_rounds=1, checkpoint=checkpoint, **settings)
    assert not first["report"]["converged"] and json.loads(checkpoint.read_text())["history"][-1]["round"] == 1
    calls = []
    original = entropy_fit.generation_sums
    monkeypatch.setattr(entropy_fit, "generation_sums", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = fit_entropy_matched(model, tok, windows, max_rounds=3, checkpoint=checkpoint, **settings)
    assert whole["report"]["converged"] and len(calls) == whole["report"]["rounds"] - 1 >= 1
    assert resumed["a"] == pytest.approx(whole["a"]) and resumed["report"]["rounds"] == whole["report"]["rounds"]
    with pytest.raises(ValueError, match="belongs to another fit"):
        fit_entropy_matched(model, tok, windows, max_rounds=3, checkpoint=checkpoint, **{**settings, "seed": 1})


def test_a_fit_interrupted_mid_pass_resumes_at_its_next_batch(lm, tmp_path, monkeypatch):
    """The lookahead's pass and a round's generations are kept batch by batch: a fit interrupted inside
    either redoes no finished batch and ends where an uninterrupted fit does; a corrupt store is refused."""
    from calibrated_sampling import entropy_fit, lookahead_fit

    model, tok, windows = lm  # 12 windows, batches of 4: 3 per pass
    settings = dict(max_new_tokens=8, bin_size=4, batch_size=4, seed=0, progress=False, future=("lookahead", 4),
                    max_rounds=3)
    whole = fit_entropy_matched(model, tok, windows, **settings)
    checkpoint = tmp_path / "rounds.json"
    stores = entropy_fit.store_paths(checkpoint)

    originals = {name: getattr(module, name) for module, name in ((lookahead_fit, "teacher_forced"),
                                                                   (entropy_fit, "_batch_sums"))}

    def count_calls(module, name: str, stop_at: int | None) -> list:
        calls, original = [], originals[name]

        def wrapped(*args, **kwargs):
            if len(calls) == stop_at:
                raise KeyboardInterrupt  # as a session ending mid-pass
            calls.append(1)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
        return calls

    count_calls(lookahead_fit, "teacher_forced", stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        fit_entropy_matched(model, tok, windows, checkpoint=checkpoint, **settings)
    assert stores["lookahead"].is_file() and not checkpoint.exists()
    with pytest.raises(ValueError, match="belongs to another run"):  # another fit's pass: kept, not overwritten
        fit_entropy_matched(model, tok, windows, checkpoint=checkpoint, **{**settings, "seed": 1})
    passes = count_calls(lookahead_fit, "teacher_forced", stop_at=None)
    count_calls(entropy_fit, "_batch_sums", stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        fit_entropy_matched(model, tok, windows, checkpoint=checkpoint, **settings)
    assert len(passes) == 2 and stores["round"].is_file()  # the pass's 2 batches left; 2 of round 1's kept
    passes.clear()
    generated = count_calls(entropy_fit, "_batch_sums", stop_at=None)
    resumed = fit_entropy_matched(model, tok, windows, checkpoint=checkpoint, **settings)
    assert passes == [] and len(generated) == 3 * whole["report"]["rounds"] - 2
    assert resumed["a"] == pytest.approx(whole["a"]) and resumed["report"]["rounds"] == whole["report"]["rounds"]
    data = bytearray(stores["lookahead"].read_bytes())
    data[-1] ^= 0xFF
    stores["lookahead"].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        fit_entropy_matched(model, tok, windows, checkpoint=checkpoint, **settings)


def test_secant_slope_steepens_a_newton_step_that_would_overshoot():
    """Where a bin's gap moved more than the closed-form slope predicts (the states a bin visits move
    with a), the step uses the measured secant; noise in the wrong direction is ignored."""
    from calibrated_sampling.entropy_fit import match_update, secant_slope

    history = [{"a": [1.0, 1.0, 1.0], "gap": [1.0, 1.0, 0.2]}, {"a": [1.1, 1.0, 1.1], "gap": [-0.2, 0.9, 0.3]}]
    slope = secant_slope(history)
    assert slope[0].item() == pytest.approx(-12.0)
    assert torch.isnan(slope[1]) and torch.isnan(slope[2])  # a did not move; the gap rose as a rose
    assert secant_slope(history[:1]) is None

    def human(ab, keys=None):  # a human side whose log loss does not depend on the schedule
        k = ab.shape[1]
        zeros = torch.zeros(3, k, dtype=torch.float64)
        return {"loss": torch.full((3, k), 2.0, dtype=torch.float64), "grad_a": zeros, "grad_b": zeros,
                "tokens": torch.ones(3, k, dtype=torch.float64)}

    a, b = torch.tensor([1.1, 1.0, 1.1], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    gen = {"entropy": torch.tensor([1.8, 2.9, 2.3], dtype=torch.float64),
           "dh_da": torch.full((3,), -4.0, dtype=torch.float64), "dh_db": torch.zeros(3, dtype=torch.float64)}
    newton = match_update(a, b, gen, human, use_future=False)["a"]
    steeper = match_update(a, b, gen, human, use_future=False, measured_slope=slope)["a"]
    assert newton[0].item() == pytest.approx(1.1 - 0.2 / 4.0)  # closed form: gap -0.2 over slope -4
    assert steeper[0].item() == pytest.approx(1.1 - 0.2 / 12.0)  # the measured secant, three times as steep
    assert torch.equal(steeper[1:], newton[1:])
