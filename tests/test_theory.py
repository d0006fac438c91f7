import math

import numpy as np
import pytest

from calibrated_sampling.theory import (
    PAPER_EXPONENTS,
    corpus_exponent,
    expected_derail_rate,
    fit_scaling,
    format_theory_table,
    plot_scaling,
    power_law,
    simulate_derailing,
    theory_table,
    words,
)


def zipf_text(a: float, n_types: int, n_words: int, seed: int) -> str:
    """n_words words drawn from p_i ∝ i^(-a), each rank spelled in letters (the tokenizer drops digits)."""
    ranks = np.random.default_rng(seed).choice(n_types, size=n_words, p=power_law(a, n_types))
    names = []
    for i in range(n_types):
        name = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            name = chr(97 + r) + name
        names.append(name)
    return " ".join(names[r] for r in ranks)


# --- simplified setting -------------------------------------------------------------------------

def test_simulated_exponents_match_one_over_a_minus_one():
    # The default table: V = 10^6, m = 1000 .. V/3, seed 0 (about 10 s on 2 cores).
    rows = theory_table()
    assert [r["a"] for r in rows] == list(PAPER_EXPONENTS)
    for r in rows:
        assert abs(r["simulated"] - (1 / r["a"] - 1)) < 0.03, r
        assert abs(r["expected"] - (1 / r["a"] - 1)) < 0.03, r
        assert r["vocab_size"] == 10**6 and r["seed"] == 0 and max(r["ms"]) <= 10**6 / 3
    table = format_theory_table(rows)
    assert "seed 0" in table and "V = 1,000,000" in table and "0.918" in table


def test_simulation_is_unbiased_for_the_exact_expectation():
    ms = [30, 100, 300]
    out = simulate_derailing(1.2, ms=ms, vocab_size=1000, trials=400, seed=1)
    exact = expected_derail_rate(1.2, ms, vocab_size=1000)
    np.testing.assert_allclose(out["rates"], exact, rtol=0.05)


def test_simulation_is_reproducible_from_its_seed():
    kwargs = dict(a=1.5, ms=[100, 300, 1000], vocab_size=10_000, trials=4)
    assert simulate_derailing(**kwargs, seed=3)["rates"] == simulate_derailing(**kwargs, seed=3)["rates"]
    assert simulate_derailing(**kwargs, seed=3)["rates"] != simulate_derailing(**kwargs, seed=4)["rates"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a=0.0), r"`a` must be > 0.5 .*but is 0.0"),
        (dict(a=-1.0), r"but is -1.0"),
        (dict(a=float("nan")), r"but is nan"),
        (dict(a=1.1, ms=[1000]), r"`ms` must hold at least two"),
        (dict(a=1.1, ms=[10, 5000], vocab_size=10_000), r"`ms` must stay at most .*3333.*largest value is 5000"),
        (dict(a=1.1, ms=[10, 100], vocab_size=1000, trials=1), r"`trials` must be at least 2 .*but is 1"),
    ],
)
def test_simulation_rejects_bad_input(kwargs, match):
    kwargs.setdefault("ms", [10, 30])
    kwargs.setdefault("vocab_size", 1000)
    with pytest.raises(ValueError, match=match):
        simulate_derailing(**kwargs)


def test_exponent_one_is_allowed_and_predicts_zero():
    out = simulate_derailing(1.0, ms=[100, 1000], vocab_size=10_000, trials=2)
    assert out["predicted"] == 0.0


# --- corpus exponent ----------------------------------------------------------------------------

def test_words_lowercases_and_keeps_inner_apostrophes():
    assert words("Don't STOP, 3 times_2 café!") == ["don't", "stop", "times", "café"]


@pytest.mark.parametrize("a", [0.9, 1.2])
def test_corpus_exponent_recovers_a_zipf_law(a):
    text = zipf_text(a, n_types=2000, n_words=300_000, seed=0)
    out = corpus_exponent([text], top=500)
    assert out["a"] == pytest.approx(a, abs=0.05)
    assert out["beta"] == pytest.approx(1 / out["a"] - 1)
    assert out["n_words"] == 300_000 and out["top"] == 500


def test_corpus_exponent_of_exact_counts_and_small_vocabularies():
    out = corpus_exponent(["the " * 60, "of " * 30 + "and " * 20])  # frequency ∝ 1 / rank exactly
    assert out["a"] == pytest.approx(1.0) and out["beta"] == pytest.approx(0.0, abs=1e-12)
    assert out["top"] == 3 and out["n_types"] == 3 and out["n_words"] == 110


def test_corpus_exponent_rejects_bad_input():
    with pytest.raises(ValueError, match="`texts` must contain at least two distinct words, but has 1"):
        corpus_exponent(["same same same"])
    with pytest.raises(ValueError, match="`top` must be at least 2 .*but is 1"):
        corpus_exponent(["a b c"], top=1)


# --- scaling fit --------------------------------------------------------------------------------

def test_fit_scaling_recovers_exact_power_law():
    params = [1.4e8, 1e9, 7e9, 7e10]
    entce = [0.8 * n**-0.13 for n in params]
    fit = fit_scaling(params, entce)
    assert fit["beta"] == pytest.approx(-0.13, abs=1e-10)
    assert fit["C"] == pytest.approx(0.8, rel=1e-8)
    assert fit["ci95"] == pytest.approx((-0.13, -0.13), abs=1e-9)
    assert fit["n_points"] == 4


def test_fit_scaling_interval_covers_true_beta_under_noise():
    rng = np.random.default_rng(0)
    params = np.geomspace(5e8, 7e10, 8)
    entce = 0.5 * params**-0.2 * np.exp(rng.normal(0, 0.05, size=8))
    fit = fit_scaling(params.tolist(), entce.tolist(), n_boot=2000, seed=0)
    lo, hi = fit["ci95"]
    assert lo < -0.2 < hi and hi - lo < 0.1
    assert fit["n_boot"] > 1900 and fit["note"] == ""


def test_fit_scaling_with_two_points_has_a_nan_interval_and_says_why():
    fit = fit_scaling([1e9, 1e10], [0.3, 0.3 * 10**-0.1])
    assert fit["beta"] == pytest.approx(-0.1)
    assert all(math.isnan(v) for v in fit["ci95"])
    assert "degenerate" in fit["note"]


@pytest.mark.parametrize(
    "params, entce, match",
    [
        ([1e9, 1e10], [0.3, -0.02], r"`entce` must be positive .*entce\[1\] = -0.02"),
        ([1e9, 1e10], [0.0, 0.1], r"entce\[0\] = 0.0"),
        ([1e9, 0.0], [0.3, 0.2], r"`params` must be positive .*params\[1\] = 0.0"),
        ([1e9, 1e10, 1e11], [0.3, 0.2], r"same length, but have 3 and 2"),
        ([1e9], [0.3], r"at least two model sizes"),
        ([1e9, 1e9], [0.3, 0.2], r"two different sizes"),
    ],
)
def test_fit_scaling_rejects_bad_input(params, entce, match):
    with pytest.raises(ValueError, match=match):
        fit_scaling(params, entce)


def test_plot_scaling_writes_a_png(tmp_path):
    params, entce = [1e8, 1e9, 1e10], [0.5, 0.4, 0.33]
    path = plot_scaling(params, entce, fit_scaling(params, entce), str(tmp_path / "scaling.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
