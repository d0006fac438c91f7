"""The paper's simplified setting, corpus power-law exponents, and scaling fits of EntCE with model size.

Simplified setting (Cao, Valiant & Liang 2025; docs/design.md, *The simplified setting*). The true next-token
distribution is a power law over a vocabulary of V tokens, p_i ∝ i^(-a). A model is trained on
m i.i.d. draws. At one step it is calibrated (step-1 entropy matches log loss), but what
follows a token is learned from that token's occurrences, and a token seen exactly once has a
continuation memorised from a single example: a generation that lands on one derails into the
high-entropy state. The derailing rate is the probability that the next token is once-seen:

    r(m) = sum_i p_i [count_i = 1],     E r(m) = sum_i p_i * m p_i (1 - p_i)^(m-1)
                                               ≈ Γ(2 - 1/a) / (a Z^(1/a)) * m^(1/a - 1)

(Z the normalizer; the approximation holds once many tokens have expected count near 1 and few of
them lie at the vocabulary's end). It equals 2 E[N_2] / (m + 1), N_2 counted in m + 1 draws: the
Good-Turing mass of once-seen tokens, so it is also what a Good-Turing smoothed model puts on them.
With per-step derailing probability r, expected entropy after t steps is
H_ok + (1 - (1 - r)^t) (H_derailed - H_ok): its slope over generation steps is proportional to r,
so both scale as m^(1/a - 1).

Why not the empirical model's own singleton mass N_1 / m (the Good-Turing *missing* mass)? For a > 1
and an unbounded vocabulary it scales the same way (the same integral with Γ(1 - 1/a)), but near
a = 1 it feels the cutoff at any V an array can hold (slope -0.20 for a = 1.114 at V = 10^6, where
1/a - 1 = -0.10). For a < 1 (WikiText's 0.918) it is dominated by the vocabulary's tail: most draws
are tokens with p_i << 1/m seen once by luck, so N_1 / m stays near the tail mass and falls with m
(slope -0.15 at V = 10^6, where 1/a - 1 = +0.089). The once-seen *true* mass weights such a token by
p_i * m p_i, so the tail drops out and m^(1/a - 1) holds for every a > 1/2. ``simulate_derailing``
reports both slopes.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

PAPER_EXPONENTS = (0.918, 1.114, 1.5)  # WikiText, WritingPrompts, CodeContests (the paper's fits)
DEFAULT_VOCAB = 10**6
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")  # runs of letters, with inner apostrophes (don't)


# --- 1. simplified setting ----------------------------------------------------------------------

def power_law(a: float, vocab_size: int) -> np.ndarray:
    """p_i ∝ i^(-a) for ranks i = 1..vocab_size, as a float64 array that sums to 1."""
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -a
    return p / p.sum()


def _check_setting(a: float, ms: np.ndarray, vocab_size: int) -> None:
    if not a > 0.5:  # also rejects NaN
        raise ValueError(f"`a` must be > 0.5 (below it the once-seen mass is set by the vocabulary cutoff, "
                         f"not by m), but is {a}")
    if vocab_size < 3:
        raise ValueError(f"`vocab_size` must be at least 3, but is {vocab_size}")
    if ms.ndim != 1 or len(np.unique(ms)) < 2 or ms.min() < 1:
        raise ValueError(f"`ms` must hold at least two distinct positive sample sizes, but is {ms.tolist()}")
    if ms.max() > vocab_size / 3:
        raise ValueError(f"`ms` must stay at most vocab_size / 3 = {vocab_size / 3:g} (the regime where the "
                         f"asymptote holds), but its largest value is {ms.max()}")


def default_ms(vocab_size: int, n: int = 8, smallest: int = 1000) -> list[int]:
    """n sample sizes spaced evenly in log from ``smallest`` (enough tokens near count 1 for the
    asymptote) to vocab_size // 3; small vocabularies start at vocab_size // 300 instead."""
    if vocab_size < 3:  # before np.geomspace meets a 0 or a negative end
        raise ValueError(f"`vocab_size` must be at least 3, but is {vocab_size}")
    if vocab_size // 3 <= smallest:
        smallest = max(1, vocab_size // 300)
    return sorted({int(m) for m in np.geomspace(smallest, vocab_size // 3, n).round()})


def expected_derail_rate(a: float, ms: Sequence[int], vocab_size: int = DEFAULT_VOCAB) -> np.ndarray:
    """Exact E r(m) = sum_i p_i * m p_i (1 - p_i)^(m-1) at finite vocabulary, one value per m."""
    ms_arr = np.asarray(ms, dtype=np.int64)
    _check_setting(a, ms_arr, vocab_size)
    p = power_law(a, vocab_size)
    log_keep = np.log1p(-p)  # (V,), log(1 - p_i) without cancellation for tiny p_i
    return np.array([np.sum(p * m * p * np.exp((m - 1) * log_keep)) for m in ms_arr])


def _loglog_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of log y on log x along the last axis; y may be (..., K)."""
    lx = np.log(x)
    ly = np.log(y)
    lx_c = lx - lx.mean()
    return ((ly - ly.mean(-1, keepdims=True)) * lx_c).sum(-1) / (lx_c**2).sum()


def _first_two_occurrences(stream: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct tokens of ``stream`` with the positions of their first and second occurrence
    (``length`` where there is none). Token i is once-seen in the first m draws iff first < m <= second."""
    tokens, first = np.unique(stream, return_index=True)
    rest = np.ones(len(stream), dtype=bool)
    rest[first] = False
    rest_pos = np.flatnonzero(rest)
    tokens2, idx2 = np.unique(stream[rest_pos], return_index=True)
    second = np.full(len(tokens), length, dtype=np.int64)
    second[np.searchsorted(tokens, tokens2)] = rest_pos[idx2]
    return tokens, first, second


def simulate_derailing(a: float, ms: Sequence[int] | None = None, vocab_size: int = DEFAULT_VOCAB,
                       trials: int = 32, seed: int = 0, n_boot: int = 1000) -> dict:
    """Simulate the derailing rate of a model trained on m draws from p_i ∝ i^(-a), for each m in ``ms``.

    Each trial draws one stream of max(ms) tokens; the model for m is trained on its first m draws
    (nested training sets, as a model that keeps reading). Given a trained model the rate
    r(m) = sum_i p_i [count_i = 1] is computed exactly rather than by sampling generations, which
    removes the generation noise and leaves only the training-set noise.

    Args:
        a: power-law exponent, > 0.5.
        ms: training-set sizes, at least two, each at most vocab_size / 3 (default ``default_ms``).
        vocab_size: V.
        trials: independent training streams per m.
        seed: seed of numpy's default generator.
        n_boot: bootstrap resamples over trials for the slope's standard error and 95% interval.

    Returns:
        dict with a, predicted (1/a - 1), simulated (log-log slope of the mean rate over trials),
        stderr and ci95 (bootstrap over trials), expected (slope of the exact expectation at this V:
        the finite-V bias without noise), singleton_fraction_slope (slope of N_1/m, the empirical
        model's own once-seen mass, for comparison), ms, rates (mean r per m), vocab_size, trials,
        seed, seconds.

    >>> out = simulate_derailing(1.5, ms=[300, 1000, 3000], vocab_size=30_000, trials=8)
    >>> abs(out["simulated"] - out["predicted"]) < 0.05
    True
    """
    start = time.perf_counter()
    ms_arr = np.asarray(default_ms(vocab_size) if ms is None else ms, dtype=np.int64)
    _check_setting(a, ms_arr, vocab_size)
    if trials < 2:
        raise ValueError(f"`trials` must be at least 2 (the error bar resamples trials), but is {trials}")
    ms_arr = np.unique(ms_arr)
    length = int(ms_arr[-1])
    p = power_law(a, vocab_size)
    cdf = np.cumsum(p)
    rng = np.random.default_rng(seed)

    rates = np.empty((trials, len(ms_arr)))  # (trials, K): r(m) of each trained model
    singles = np.empty((trials, len(ms_arr)))  # (trials, K): N_1(m) / m
    for t in range(trials):
        # Inverse-CDF sampling; the clip guards against cdf[-1] rounding a hair below 1.
        stream = np.minimum(np.searchsorted(cdf, rng.random(length), side="right"), vocab_size - 1)
        tokens, first, second = _first_two_occurrences(stream, length)
        once = (first[None, :] < ms_arr[:, None]) & (second[None, :] >= ms_arr[:, None])  # (K, distinct)
        rates[t] = once @ p[tokens]
        singles[t] = once.sum(1) / ms_arr

    mean_rate = rates.mean(0)
    boot = rng.integers(0, trials, size=(n_boot, trials))  # resample whole trials (rows are correlated in m)
    boot_slopes = _loglog_slope(ms_arr, rates[boot].mean(1))
    return {
        "a": a,
        "predicted": 1 / a - 1,
        "simulated": float(_loglog_slope(ms_arr, mean_rate)),
        "stderr": float(boot_slopes.std(ddof=1)),
        "ci95": tuple(float(q) for q in np.percentile(boot_slopes, [2.5, 97.5])),
        "expected": float(_loglog_slope(ms_arr, expected_derail_rate(a, ms_arr, vocab_size))),
        "singleton_fraction_slope": float(_loglog_slope(ms_arr, singles.mean(0))),
        "ms": ms_arr.tolist(),
        "rates": mean_rate.tolist(),
        "vocab_size": vocab_size,
        "trials": trials,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }


def theory_table(exponents: Sequence[float] = PAPER_EXPONENTS, ms: Sequence[int] | None = None,
                 vocab_size: int = DEFAULT_VOCAB, trials: int = 32, seed: int = 0) -> list[dict]:
    """``simulate_derailing`` for each exponent (the paper's three corpora by default), same sizes and seed."""
    return [simulate_derailing(a, ms, vocab_size, trials, seed) for a in exponents]


def format_theory_table(rows: Sequence[dict]) -> str:
    """A plain-text table of ``theory_table`` rows, with the sizes and seed that produced them."""
    lines = [f"{'a':>6} {'1/a-1':>8} {'simulated':>10} {'±stderr':>8} {'95% CI':>18} {'exact E':>8} "
             f"{'diff':>7} {'N1/m':>7}"]
    for r in rows:
        ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        lines.append(f"{r['a']:>6.3f} {r['predicted']:>+8.3f} {r['simulated']:>+10.4f} {r['stderr']:>8.4f} "
                     f"{ci:>18} {r['expected']:>+8.4f} {r['simulated'] - r['predicted']:>+7.4f} "
                     f"{r['singleton_fraction_slope']:>+7.3f}")
    if rows:
        r = rows[0]
        lines.append(f"V = {r['vocab_size']:,}, m = {r['ms'][0]:,} .. {r['ms'][-1]:,} ({len(r['ms'])} sizes), "
                     f"{r['trials']} trials, seed {r['seed']}, {sum(x['seconds'] for x in rows):.1f} s")
        lines.append("simulated: log-log slope of the once-seen true mass r(m); exact E: the same for its "
                     "exact expectation at this V; N1/m: the empirical model's singleton fraction.")
    return "\n".join(lines)


# --- 2. corpus exponent -------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lowercased runs of letters (apostrophes inside a word kept); digits and punctuation split words."""
    return WORD.findall(text.lower())


def corpus_exponent(texts: Iterable[str] | str, top: int = 5000) -> dict:
    """Power-law exponent a of a corpus's word rank-frequency curve, as the paper measures it:
    least squares of log frequency on log rank over the ``top`` most frequent words.

    Args:
        texts: documents (a single string is taken as one document).
        top: how many of the most frequent words to fit (fewer if the corpus has fewer types).

    Returns:
        dict with a, beta (= 1/a - 1, the predicted scaling exponent), n_words (tokens), n_types
        (distinct words), top (words actually fitted), r2 of the fit.

    >>> round(corpus_exponent("the " * 60 + "of " * 30 + "and " * 20)["a"], 6)  # frequency ∝ 1 / rank
    1.0
    """
    if top < 2:
        raise ValueError(f"`top` must be at least 2 (a slope needs two ranks), but is {top}")
    counts: Counter[str] = Counter()
    for text in [texts] if isinstance(texts, str) else texts:
        counts.update(words(text))
    if len(counts) < 2:
        raise ValueError(f"`texts` must contain at least two distinct words, but has {len(counts)}")
    freq = np.array(sorted(counts.values(), reverse=True)[:top], dtype=np.float64)
    log_rank = np.log(np.arange(1, len(freq) + 1))
    log_freq = np.log(freq)
    slope, intercept = np.polyfit(log_rank, log_freq, 1)
    resid = log_freq - (slope * log_rank + intercept)
    a = -float(slope)
    return {
        "a": a,
        "beta": 1 / a - 1 if a != 0 else math.inf,
        "n_words": int(sum(counts.values())),
        "n_types": len(counts),
        "top": len(freq),
        "r2": float(1 - resid.var() / log_freq.var()) if log_freq.var() > 0 else 1.0,
    }


# --- 3. scaling fit -----------------------------------------------------------------------------

def fit_scaling(params: Sequence[float], entce: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Fit EntCE = C * N^beta by least squares in log-log space, with a bootstrap 95% interval for beta.

    The bootstrap resamples the model points with replacement; a resample whose points all share one
    N has no slope and is dropped. With two points every usable resample is the original pair, so
    the interval says nothing: it is returned as (nan, nan) with a note.

    Args:
        params: model sizes N (> 0).
        entce: EntCE of each model (> 0: a power law through zero or negative values has no log).
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        dict with beta, C, ci95, n_points, n_boot (resamples used), note.

    >>> round(fit_scaling([1e8, 1e9, 1e10], [0.4, 0.4 * 10**-0.1, 0.4 * 10**-0.2])["beta"], 6)
    -0.1
    """
    if len(params) != len(entce):
        raise ValueError(f"`params` and `entce` must have the same length, but have {len(params)} and {len(entce)}")
    if len(params) < 2:
        raise ValueError(f"`params` must hold at least two model sizes, but is {list(params)}")
    for name, values in (("params", params), ("entce", entce)):
        for i, v in enumerate(values):
            if not v > 0:  # also rejects NaN
                raise ValueError(f"`{name}` must be positive for a log-log fit, but {name}[{i}] = {v}")
    x = np.log(np.asarray(params, dtype=np.float64))
    y = np.log(np.asarray(entce, dtype=np.float64))
    if np.ptp(x) == 0:
        raise ValueError(f"`params` must hold at least two different sizes, but is {list(params)}")
    n = len(x)
    beta, log_c = np.polyfit(x, y, 1)

    note = ""
    ci = (math.nan, math.nan)
    used = 0
    if n == 2:
        note = "2 points: the bootstrap interval is degenerate (every usable resample is the same pair); ci95 is NaN"
    else:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n) resampled points
        xb, yb = x[idx], y[idx]
        xc = xb - xb.mean(1, keepdims=True)
        sxx = (xc**2).sum(1)
        ok = sxx > 1e-12 * max(1.0, float(np.ptp(x)) ** 2)  # drop resamples with a single distinct N
        slopes = (xc * (yb - yb.mean(1, keepdims=True))).sum(1)[ok] / sxx[ok]
        used = int(ok.sum())
        if used:
            ci = tuple(float(q) for q in np.percentile(slopes, [2.5, 97.5]))
        if n < 5:
            note = f"{n} points: few distinct resamples, so the bootstrap interval is coarse"
    return {"beta": float(beta), "C": float(np.exp(log_c)), "ci95": ci, "n_points": n, "n_boot": used,
            "note": note}


def fit_entce_scaling(params: Sequence[float], entce: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """``fit_scaling`` of measured EntCE values, which may all be negative (a model more certain on
    its own text than on human text): then the fit is of |EntCE| = C * N^beta, and says so.

    Returns ``fit_scaling``'s dict plus ``fitted`` ("EntCE" or "|EntCE|") and ``entce_fitted`` (the
    values fitted). Raises ValueError when the values have both signs or include 0 (no power law).

    >>> fit = fit_entce_scaling([1e8, 1e9], [-0.5, -0.25])
    >>> fit["fitted"], round(fit["beta"], 4)
    ('|EntCE|', -0.301)
    """
    values = [float(v) for v in entce]
    if values and all(v < 0 for v in values):
        fit = fit_scaling(params, [-v for v in values], n_boot=n_boot, seed=seed)
        note = "EntCE < 0 for every model: the fit is of |EntCE|"
        fit.update(fitted="|EntCE|", entce_fitted=[-v for v in values],
                   note=f"{note}; {fit['note']}" if fit["note"] else note)
        return fit
    if any(not v > 0 for v in values) and any(v > 0 for v in values):
        raise ValueError(f"`entce` has values of both signs (or zero or NaN), which no power law fits: {values}")
    fit = fit_scaling(params, values, n_boot=n_boot, seed=seed)
    fit.update(fitted="EntCE", entce_fitted=values)
    return fit


def plot_scaling(params: Sequence[float], entce: Sequence[float], fit: dict, path: str) -> str:
    """Write a log-log PNG of EntCE against model size with the fitted power law; returns ``path``.

    Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.asarray(params, dtype=np.float64)
    grid = np.geomspace(x.min(), x.max(), 50)
    ax.loglog(x, entce, "o", label="models")
    lo, hi = fit["ci95"]
    interval = f", 95% CI [{lo:+.3f}, {hi:+.3f}]" if not math.isnan(lo) else ""
    ax.loglog(grid, fit["C"] * grid ** fit["beta"], "-", label=f"fit: beta = {fit['beta']:+.3f}{interval}")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(f"{fit.get('fitted', 'EntCE')} (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
