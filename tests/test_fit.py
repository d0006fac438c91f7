"""Fitting the calibration weights: Newton against brute force, streaming, the exact Markov-chain check of
the method (EntCE -> 0 with per-step weights fitted backwards), fit_weights on a tiny LM, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from calibrated_sampling.data import Window
from calibrated_sampling.fit import (
    check_calibration,
    exact_markov_calibration,
    fit_bins,
    fit_weights,
    markov_measures,
    save_calibration,
    tensor_chunks,
)
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def random_problem(seed: int, rows: int = 300, vocab: int = 7, bins: int = 2, a: float = 1.3, b: float = 0.15):
    """Log p, F, bins and human tokens drawn from q ∝ exp(a log p - b F), so the optimum is near (a, b)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)
    future = 3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64) + 5 * torch.rand(rows, 1, generator=g)
    q = torch.softmax(a * logp - b * future, -1)
    target = torch.multinomial(q.float(), 1, generator=g)[:, 0]
    return logp, future, target, torch.randint(bins, (rows,), generator=g)


def grid_loss(logp, future, target, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean -log q(y) for every (a, b) pair of the flat grids a, b: (G,) -> (G,)."""
    logits = a[:, None, None] * logp - b[:, None, None] * future  # (G, N, V)
    return (torch.logsumexp(logits, -1) - logits.gather(-1, target.expand(len(a), -1)[..., None])[..., 0]).mean(1)


def grid_minimum(lp, f, y, tied: bool) -> tuple[float, torch.Tensor]:
    """Brute force, coarse to fine: (min loss, (a, b) at the minimum) over grids of 41 (x 41) points, each
    level 20 times finer around the previous level's best point (last spacing 2.5e-4 or finer)."""
    center, width = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
    for _ in range(3):
        if tied:  # a = 1 + alpha, b = alpha
            alpha = center[1] + torch.linspace(-1, 1, 41, dtype=torch.float64) * width[0]
            a, b = 1 + alpha, alpha
        else:
            a, b = torch.meshgrid(center[0] + torch.linspace(-1, 1, 41, dtype=torch.float64) * width[0],
                                  center[1] + torch.linspace(-1, 1, 41, dtype=torch.float64) * width[1], indexing="ij")
            a, b = a.reshape(-1), b.reshape(-1)
        losses = grid_loss(lp, f, y, a, b)
        best = losses.argmin()
        center, width = torch.stack([a[best], b[best]]), width / 20
    return losses.min().item(), center


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_matches_a_brute_force_grid(seed):
    logp, future, target, bins = random_problem(seed)
    tied = fit_bins(tensor_chunks(logp, future, target, bins, chunk_rows=64), 2, "tied")
    untied = fit_bins(tensor_chunks(logp, future, target, bins, chunk_rows=64), 2, "untied")
    assert tied["converged"] and untied["converged"]
    for j in range(2):
        rows = bins == j
        for fit, is_tied, spacing in ((tied, True, 2.5e-4), (untied, False, 1.25e-3)):
            loss, (a, b) = grid_minimum(logp[rows], future[rows], target[rows], is_tied)
            assert fit["loss"][j] <= loss + 1e-12
            assert abs(fit["a"][j] - a) <= spacing and abs(fit["b"][j] - b) <= spacing
        assert float(tied["a"][j]) == pytest.approx(1 + float(tied["b"][j]), abs=1e-12)
        assert untied["loss"][j] <= tied["loss"][j] + 1e-12  # untied contains tied


def test_fitted_loss_is_never_above_the_base():
    for seed in range(6):
        logp, future, target, bins = random_problem(seed, rows=120, bins=3, a=1.0, b=0.0)  # the base is the truth
        if seed % 2:
            future = future[:, :1].expand_as(future).clone()  # F constant over v: b has no effect
        for form in ("tied", "untied", "global"):
            fit = fit_bins(tensor_chunks(logp, future, target, bins), 3, form)
            if form == "global":
                total = (fit["loss"] * fit["tokens"]).sum() / fit["tokens"].sum()
                assert total <= (fit["loss_base"] * fit["tokens"]).sum() / fit["tokens"].sum() + 1e-15
                assert len(set(fit["b"].tolist())) == 1
            else:
                assert (fit["loss"] <= fit["loss_base"] + 1e-15).all()
            if seed % 2 and form != "untied":  # the only feature is log p - const: alpha acts as a temperature
                assert torch.isfinite(fit["a"]).all()


def test_empty_bins_keep_the_base_weights():
    logp, future, target, bins = random_problem(0, rows=60, bins=2)
    fit = fit_bins(tensor_chunks(logp, future, target, bins), 4, "untied")
    assert fit["tokens"][2:].tolist() == [0, 0]
    assert fit["a"][2:].tolist() == [1.0, 1.0] and fit["b"][2:].tolist() == [0.0, 0.0]


def test_chunked_streaming_equals_one_chunk():
    logp, future, target, bins = random_problem(3, rows=200, bins=3)
    weight = torch.rand(200, dtype=torch.float64)
    for form in ("tied", "untied", "global"):
        small = fit_bins(tensor_chunks(logp, future, target, bins, weight, chunk_rows=7), 3, form)
        whole = fit_bins(tensor_chunks(logp, future, target, bins, weight, chunk_rows=10_000), 3, form)
        for key in ("a", "b", "loss", "loss_base", "tokens", "entropy"):
            torch.testing.assert_close(small[key], whole[key], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# The method, exactly: a Markov chain whose F is known


def drifting_chain(n: int = 6, leak: float = 0.2, stick: float = 0.5):
    """Human chain: n - 1 ordinary tokens with peaked transitions, and a rare 'derailed' token 0 with
    uniform next-token distribution. The model leaks into token 0 more often and stays there (sticky), so
    its generation entropy climbs with the step while the human log loss stays flat (the start is the
    human chain's stationary distribution)."""
    torch.manual_seed(0)
    normal = torch.distributions.Dirichlet(torch.full((n - 1,), 0.2)).sample((n - 1,)).double() * 0.95 + 0.05 / (n - 1)
    human = torch.zeros(n, n, dtype=torch.float64)
    human[1:, 1:], human[1:, 0], human[0] = normal * 0.99, 0.01, 1.0 / n
    model = human.clone()
    model[1:, 1:], model[1:, 0] = normal * (1 - leak), leak
    model[0], model[0, 0] = (1 - stick) / (n - 1), stick
    human, model = human / human.sum(-1, keepdim=True), model / model.sum(-1, keepdim=True)  # rows sum to 1 exactly
    initial = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(500):
        initial = initial @ human
    return human, model, initial


T_MARKOV = 12


@pytest.fixture(scope="module")
def markov():
    human, model, initial = drifting_chain()
    base = markov_measures(human, model.expand(T_MARKOV, *model.shape), initial)
    runs = {"backward-tied": exact_markov_calibration(human, model, initial, T_MARKOV, form="tied"),
            "backward-untied": exact_markov_calibration(human, model, initial, T_MARKOV, form="untied"),
            "one-round-tied": exact_markov_calibration(human, model, initial, T_MARKOV, form="tied", rounds=1),
            "global-one-round": exact_markov_calibration(human, model, initial, T_MARKOV, form="global", rounds=1),
            "global-fixed-point": exact_markov_calibration(human, model, initial, T_MARKOV, form="global", rounds=30)}
    return human, initial, base, {k: (r, markov_measures(human, r["transitions"], initial)) for k, r in runs.items()}


def test_the_base_chain_drifts(markov):
    _, _, base, _ = markov
    assert base["entce"] > 0.15
    assert base["gen_entropy"][-1] - base["gen_entropy"][0] > 0.08  # entropy climbs along generations ...
    assert base["log_loss"].max() - base["log_loss"].min() < 1e-12  # ... while the human log loss is flat


@pytest.mark.parametrize("form", ["tied", "untied"])
def test_backward_per_step_fit_calibrates_exactly(markov, form):
    _, _, base, runs = markov
    result, measured = runs[f"backward-{form}"]
    assert abs(measured["entce"]) < 1e-7
    assert (measured["log_loss"] <= base["log_loss"] + 1e-12).all()  # every step's loss, not just the mean
    assert measured["log_loss"].mean() < base["log_loss"].mean() - 0.03
    if form == "tied":  # the last step has F = 0: a pure temperature; earlier steps follow a schedule
        assert float(result["a"][-1] - result["b"][-1]) == pytest.approx(1.0)
        assert result["b"][0] - result["b"][-1] > 0.1
    else:
        assert result["b"][-1] == 0.0


def test_global_weight_with_f_of_the_base_misses_and_only_rounds_reach_zero(markov):
    _, _, _, runs = markov
    exact = abs(runs["backward-tied"][1]["entce"])
    one_round = abs(runs["global-one-round"][1]["entce"])
    assert one_round > 0.01 and one_round > 1e4 * exact
    assert abs(runs["one-round-tied"][1]["entce"]) > 1e-3  # per-step weights with F of the base miss too
    # The sum of the per-step conditions does telescope once F describes the calibrated model itself: a
    # global alpha iterated to its fixed point is calibrated as well, at a higher log loss (this chain).
    fixed = runs["global-fixed-point"][1]
    assert abs(fixed["entce"]) < 1e-7
    assert fixed["log_loss"].mean() > runs["backward-tied"][1]["log_loss"].mean() + 1e-3


def test_backward_fit_on_sampled_human_text_is_calibrated_within_sampling_noise(markov):
    human, initial, _, _ = markov
    sequences, n = 4000, len(initial)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.multinomial(initial, sequences, replacement=True, generator=g)]
    for _ in range(T_MARKOV):
        tokens.append(torch.multinomial(human[tokens[-1]], 1, generator=g)[:, 0])
    tokens = torch.stack(tokens, 1)  # (S, T + 1): the prompt's last token, then T human tokens
    state, token = tokens[:, :-1], tokens[:, 1:]
    frequencies = torch.zeros(T_MARKOV, n * n, dtype=torch.float64)
    frequencies.scatter_add_(1, (state * n + token).T, torch.ones(T_MARKOV, sequences, dtype=torch.float64))
    _, model, _ = drifting_chain()
    result = exact_markov_calibration(human, model, initial, T_MARKOV, frequencies=frequencies.view(-1, n, n)
                                      / sequences)
    measured = markov_measures(human, result["transitions"], initial)  # exact, under the true human chain
    # EntCE = -(1/T) sum_t E[z_t] exactly, with z = -log q(y) + F(y) - H(q) - E_q F; the fit zeroes the sample
    # mean of every z_t, so the error is a sample mean's deviation: its standard error is that of per-sequence sums.
    q, future = result["transitions"], result["future"]
    steps = torch.arange(T_MARKOV)
    rows_q = q[steps, state]  # (S, T, n)
    z = (-rows_q.gather(-1, token[..., None])[..., 0].log() + future[steps, token]
         + (rows_q * rows_q.log()).sum(-1) - (rows_q * future[steps][None]).sum(-1))
    stderr = z.mean(1).std().item() / math.sqrt(sequences)
    assert abs(z.mean().item()) < 1e-7  # the empirical condition holds
    assert abs(measured["entce"]) < 4 * stderr
    assert stderr < 0.02


def test_markov_errors():
    human, model, initial = drifting_chain(n=3)
    with pytest.raises(ValueError, match="rounds"):
        exact_markov_calibration(human, model, initial, 4, form="global")
    with pytest.raises(ValueError, match="`frequencies`"):
        exact_markov_calibration(human, model, initial, 4, frequencies=torch.ones(3, 3, 3))


# ----------------------------------------------------------------------------------------------------
# fit_weights on a tiny LM


def windows_of(seed: int, count: int, steps: int) -> list[Window]:
    """Windows with prompts of different lengths (left padding in a batch) and random human tokens."""
    g = torch.Generator().manual_seed(seed)
    return [Window(tuple(torch.randint(3, 99, (5 + i % 4,), generator=g).tolist()),
                   tuple(torch.randint(3, 99, (steps,), generator=g).tolist()), f"doc{i}", "test")
            for i in range(count)]


@pytest.fixture(scope="module")
def tiny_head():
    model, tokenizer = make_model(), make_tokenizer(with_pad=True)
    config = HeadConfig.for_model(model, tokenizer, mlp_hidden=16, lm_parameters=None, max_horizon=16)
    head = FutureEntropyHead(config, model.get_output_embeddings().weight)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return model, tokenizer, head


@pytest.mark.parametrize("form", ["tied", "untied", "global"])
def test_fit_weights_matches_a_direct_computation_and_round_trips(tiny_head, form, tmp_path):
    model, tokenizer, head = tiny_head
    steps, bin_size = 8, 3
    windows = windows_of(0, 6, steps + 2)  # longer than T: cut to T
    with pytest.warns(UserWarning, match="3 of 3 bins have fewer than 1000 human tokens"):
        calibration = fit_weights(model, tokenizer, head, windows, max_new_tokens=steps, bin_size=bin_size,
                                  form=form, batch_size=4, progress=False, heldout_windows=windows_of(1, 3, steps))
    check_calibration(calibration)
    report = calibration["report"]
    assert len(calibration["a"]) == 3 and [r["tokens"] for r in report["bins"]] == [18, 18, 12]
    assert report["fit"]["tokens"] == 48 and report["heldout"]["tokens"] == 24 and report["converged"]
    fit_total = report["fit"]
    assert fit_total["loss"] <= fit_total["loss_base"] + 1e-12
    # Direct: each window alone (no padding), q from head.calibrated_logits with k = T - 1 - t.
    base, calibrated = [], []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([list(w.prompt_ids) + list(w.continuation_ids[:steps])])
            hidden = model.model(ids).last_hidden_state[0, len(w.prompt_ids) - 1:-1]  # (T, H)
            logits = model.lm_head(hidden)
            t = torch.arange(steps)
            a = torch.tensor(calibration["a"])[t // bin_size]
            b = torch.tensor(calibration["b"])[t // bin_size]
            q = head.calibrated_logits(hidden, steps - 1 - t, logits, a, b)
            y = torch.tensor(w.continuation_ids[:steps])
            base.append(-torch.log_softmax(logits, -1)[t, y])
            calibrated.append(-torch.log_softmax(q, -1)[t, y])
    assert fit_total["loss_base"] == pytest.approx(torch.cat(base).mean().item(), abs=1e-5)
    assert fit_total["loss"] == pytest.approx(torch.cat(calibrated).mean().item(), abs=1e-5)
    # Save into a head folder and load it back.
    head.save_pretrained(tmp_path)
    save_calibration(tmp_path, calibration)
    assert load_config(tmp_path).calibration == calibration
    loaded = FutureEntropyHead.from_pretrained(tmp_path, model=model, tokenizer=tokenizer)
    assert loaded.config.calibration == calibration


def test_fit_weights_bad_arguments(tiny_head, tmp_path):
    model, tokenizer, head = tiny_head
    windows = windows_of(0, 2, 6)
    with pytest.raises(ValueError, match=r"`bin_size` must be a positive integer, but is 0"):
        fit_weights(model, tokenizer, head, windows, max_new_tokens=6, bin_size=0, progress=False)
    with pytest.raises(ValueError, match=r"`form` must be one of tied, untied, global, but is 'both'"):
        fit_weights(model, tokenizer, head, windows, max_new_tokens=6, bin_size=2, form="both", progress=False)
    with pytest.raises(ValueError, match=r"`max_new_tokens` is 8, but windows\[0\] has only 6"):
        fit_weights(model, tokenizer, head, windows, max_new_tokens=8, bin_size=2, progress=False)
    with pytest.raises(ValueError, match=r"heldout_windows\[0\] has only 6"):
        fit_weights(model, tokenizer, head, windows_of(0, 2, 8), max_new_tokens=8, bin_size=2, progress=False,
                    heldout_windows=windows)
    with pytest.raises(ValueError, match="`windows` is empty"):
        fit_weights(model, tokenizer, head, [], max_new_tokens=6, bin_size=2, progress=False)
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive integer"):
        fit_weights(model, tokenizer, head, windows, max_new_tokens=0, bin_size=2, progress=False)
    with pytest.raises(ValueError, match=r"`form` must be one of"):
        fit_bins(tensor_chunks(*random_problem(0)[:4]), 2, "global-untied")
    bad = {"form": "tied", "max_new_tokens": 8, "bin_size": 3, "a": [1.0, 1.0], "b": [0.0, 0.0]}
    with pytest.raises(ValueError, match=r"calibration `a` must be a list of ceil\(max_new_tokens / bin_size\) = 3"):
        check_calibration(bad)
    head.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"calibration `a`"):
        save_calibration(tmp_path, bad)
    with pytest.raises(FileNotFoundError):
        save_calibration(tmp_path / "missing", {**bad, "a": [1.0] * 3, "b": [0.0] * 3})


def test_cli_fit_writes_the_weights_and_prints_the_table(tmp_path, capsys):
    from conftest import word_text

    from calibrated_sampling.cli import main
    from calibrated_sampling.models import load_model

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    model, tokenizer = load_model(str(tmp_path / "model"))
    config = HeadConfig.for_model(model, tokenizer, mlp_hidden=16, lm_parameters=None, max_horizon=16)
    FutureEntropyHead(config, model.get_output_embeddings().weight).save_pretrained(tmp_path / "head")
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "text").mkdir()
    for i in range(16):  # one document per file: both sides of the fit / eval split get some
        (tmp_path / "text" / f"{i}.txt").write_text(word_text(rng, 60))
    args = ["fit", "--objective", "log-loss", "--model", str(tmp_path / "model"), "--head", str(tmp_path / "head"), "--data",
            str(tmp_path / "text"), "--num-prompts", "6", "--heldout-prompts", "4", "--prompt-tokens", "8",
            "--max-new-tokens", "8", "--bin-size", "4", "--form", "untied"]
    with pytest.warns(UserWarning, match="fewer than 1000 human tokens"):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "held base" in out and "form untied, 6 fit windows, 4 held-out windows" in out
    calibration = load_config(tmp_path / "head").calibration
    assert calibration["form"] == "untied" and len(calibration["a"]) == 2
    assert calibration["report"]["heldout"]["tokens"] == 32 and calibration["report"]["fit"]["tokens"] == 48
    # --out: a copy with another schedule; the original keeps its own.
    with pytest.warns(UserWarning, match="fewer than 1000 human tokens"):
        assert main([*args[:-6], "--max-new-tokens", "12", "--bin-size", "4", "--form", "untied", "--out",
                     str(tmp_path / "copy")]) == 0
    assert load_config(tmp_path / "copy").calibration["max_new_tokens"] == 12
    assert load_config(tmp_path / "head").calibration["max_new_tokens"] == 8
    with pytest.raises(SystemExit):
        main([*args[:-2], "--form", "both"])
    capsys.readouterr()
    assert main([*args, "--bin-size", "0"]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "`--bin-size` must be at least 1, but is 0" in err and "Loading weights" not in err


@pytest.mark.slow
def test_real_model_token_independent_head_fits_a_temperature(smollm):
    """A fresh head predicts F constant over v (a per-context rate), so b cannot matter: the tied fit is a
    per-bin temperature, the untied fit must find the same a with b = 0."""
    from calibrated_sampling.data import load_documents, make_windows

    model, tokenizer = smollm
    windows = make_windows(load_documents("pydoc"), tokenizer, 2, prompt_tokens=32, continuation_tokens=32,
                           split="fit")
    torch.manual_seed(0)
    head = FutureEntropyHead(HeadConfig.for_model(model, tokenizer, mlp_hidden=64, mlp_layers=1),
                             model.get_output_embeddings().weight)
    head.set_rate(2.0)
    fits = {}
    for form in ("tied", "untied"):
        with pytest.warns(UserWarning, match="fewer than 1000"):
            fits[form] = fit_weights(model, tokenizer, head, windows, max_new_tokens=32, bin_size=16, form=form,
                                     progress=False)
    tied, untied = fits["tied"], fits["untied"]
    assert tied["report"]["fit"]["loss"] <= tied["report"]["fit"]["loss_base"]
    assert untied["b"] == [0.0, 0.0]  # exactly: F constant over v gives b a zero gradient
    assert untied["a"] == pytest.approx(tied["a"], abs=1e-4)
    assert untied["report"]["fit"]["loss"] == pytest.approx(tied["report"]["fit"]["loss"], abs=1e-7)


def test_row_stats_of_the_loss_alone_match_the_full_computation():
    """The multiplier search asks for the loss only; that shortcut must give the very same loss."""
    from calibrated_sampling.fit import SUM_KEYS, _row_stats

    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 40, generator=gen, dtype=torch.float64), -1)
    future = torch.rand(5, 40, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 40, (5,), generator=gen)
    a, b = torch.full((5,), 0.9, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    full = _row_stats(logp, future, target, a, b, SUM_KEYS)
    alone = _row_stats(logp, future, target, a, b, ("weight", "loss"))
    assert set(alone) == {"loss"} and set(full) >= set(SUM_KEYS) - {"weight"}
    assert torch.equal(alone["loss"], full["loss"])
    log_q = torch.log_softmax(a[:, None] * logp - b[:, None] * future, -1)
    assert torch.allclose(full["loss"], -log_q.gather(-1, target[:, None])[:, 0])
