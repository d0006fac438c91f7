import importlib
import json
import math

import pytest
import torch
from conftest import EOS_ID, make_model, make_tokenizer, word_text
from transformers import LogitsProcessor, LogitsProcessorList

from calibrated_sampling.cli import main
from calibrated_sampling.data import Window, batch_windows
from calibrated_sampling.measure import generate_with_entropy, measure
from calibrated_sampling.metrics import entropy

measure_module = importlib.import_module("calibrated_sampling.measure")  # the package's `measure` is the function


def random_windows(n, prompt_lengths, steps, seed=0):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 99, (prompt_lengths[i % len(prompt_lengths)] + steps,), generator=rng).tolist()
        cut = len(ids) - steps
        out.append(Window(tuple(ids[:cut]), tuple(ids[cut:]), f"doc{i}", "test"))
    return out


def direct_log_loss(model, window):
    ids = torch.tensor([window.prompt_ids + window.continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    p = len(window.prompt_ids)
    targets = ids[0, p:]
    return -logp[p - 1:-1].gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk_steps", [1, 3, 100])  # output-embedding products of 1, 3 or all steps at once
def test_base_log_loss_equals_direct_teacher_forcing(tiny, monkeypatch, chunk_steps):
    model, tok = tiny
    windows = random_windows(3, [6, 9, 4], 10)
    monkeypatch.setattr(measure_module, "CHUNK_LOGITS", chunk_steps * 3 * model.config.vocab_size)
    result = measure(model, tok, windows, ["base"], batch_size=3, progress=False)["base"]
    direct = torch.cat([direct_log_loss(model, w) for w in windows])
    assert result["log_loss"] == pytest.approx(direct.mean().item(), abs=1e-5)
    assert result["entce"] == pytest.approx(result["gen_entropy"] - result["log_loss"])
    per_step = torch.stack([direct_log_loss(model, w) for w in windows]).mean(0)
    torch.testing.assert_close(torch.tensor(result["per_step"]["log_loss"], dtype=torch.float64), per_step.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["base", "temperature=0.7+top_p=0.9", "min_p=0.05", "top_k=5"])
def test_rowwise_teacher_forcing_equals_the_step_by_step_pass(tiny, monkeypatch, spec):
    """Warpers are applied to many steps at once; a step-by-step pass of the same q gives the same numbers."""
    from calibrated_sampling.samplers import parse_sampler

    model, tok = tiny
    windows = random_windows(3, [6, 9, 4], 10)
    monkeypatch.setattr(measure_module, "CHUNK_LOGITS", 4 * 3 * model.config.vocab_size)  # chunks of 4 steps
    batched = parse_sampler(spec)
    stepwise = parse_sampler(spec)
    stepwise.rowwise = False
    assert batched.rowwise
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    one, two = (measure_module.teacher_forced(model, s, windows, pad) for s in (batched, stepwise))
    for name in ("log_loss", "smoothed", "entropy", "truncated"):
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=0)


def test_tokenizer_without_pad_token_is_handled():
    model, tok = make_model(), make_tokenizer(with_pad=False)
    assert tok.pad_token_id is None
    windows = random_windows(2, [5, 7], 6)
    result = measure(model, tok, windows, ["base"], batch_size=2, progress=False)
    assert math.isfinite(result["base"]["gen_entropy"])


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny):
    model, tok = tiny
    windows = random_windows(4, [3, 8, 5, 11], 8)
    batched = measure(model, tok, windows, ["temperature=0.8"], batch_size=4, progress=False)["temperature=0.8"]
    single = [measure(model, tok, [w], ["temperature=0.8"], batch_size=1, progress=False)["temperature=0.8"]
              for w in windows]
    # Log loss is deterministic: identical per prompt, so the means agree.
    assert batched["log_loss"] == pytest.approx(sum(s["log_loss"] for s in single) / 4, abs=1e-5)
    # The first generated step depends only on the prompt: its entropy agrees too (later steps are sampled).
    first = sum(s["per_step"]["gen_entropy"][0] for s in single) / 4
    assert batched["per_step"]["gen_entropy"][0] == pytest.approx(first, abs=1e-5)


def test_recorded_entropy_is_the_entropy_of_the_sampled_distribution(tiny):
    model, tok = tiny
    windows = random_windows(2, [5, 7], 0)
    ids, mask = batch_windows(windows, tok.pad_token_id, with_continuation=False)
    from calibrated_sampling.samplers import parse_sampler

    record = generate_with_entropy(model, ids, mask, parse_sampler("temperature=0.7").processors, 6, seed=3,
                                   capture_hidden=True)
    for row, window in enumerate(windows):
        full = torch.tensor([list(window.prompt_ids) + record.sequences[row].tolist()])
        with torch.no_grad():
            out = model(full, output_hidden_states=True)
        p = len(window.prompt_ids)
        expected = entropy(out.logits[0, p - 1:-1] / 0.7)
        torch.testing.assert_close(record.entropy[row], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(record.hidden[row], out.hidden_states[-1][0, p - 1:-1], atol=1e-4, rtol=1e-4)


class ForceEos(LogitsProcessor):
    """Row 0 emits EOS at step 2; other rows never do."""

    def __init__(self, prompt_length):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, EOS_ID] = -math.inf
        if input_ids.shape[1] - self.prompt_length == 2:
            scores[0] = -math.inf
            scores[0, EOS_ID] = 0.0
        return scores


def test_rows_stop_counting_after_eos(tiny):
    model, tok = tiny
    windows = random_windows(2, [5], 0)
    ids, mask = batch_windows(windows, tok.pad_token_id, with_continuation=False)
    record = generate_with_entropy(model, ids, mask, LogitsProcessorList([ForceEos(ids.shape[1])]), 6, seed=0)
    assert record.running[0].tolist() == [True, True, True, False, False, False]
    assert record.running[1].all()


def test_truncating_sampler_reports_inf_and_smoothed(tiny):
    model, tok = tiny
    windows = random_windows(4, [6], 12)
    r = measure(model, tok, windows, ["top_k=3"], batch_size=2, progress=False)["top_k=3"]
    assert math.isinf(r["log_loss"]) and r["truncated_fraction"] > 0.5
    assert math.isfinite(r["log_loss_smoothed"]) and r["entce_uses_smoothed"]
    assert r["entce"] == pytest.approx(r["gen_entropy"] - r["log_loss_smoothed"])


def _cli_measure_args(tmp_path, tiny_model) -> list[str]:
    """A saved tiny model and a text file in ``tmp_path``, and the `measure` arguments that use them
    (3 prompts x 10 tokens; no --samplers, no --out)."""
    tok = make_tokenizer()
    tiny_model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(word_text(rng, 60) for _ in range(12)))
    return ["measure", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--split", "all",
            "--num-prompts", "3", "--prompt-tokens", "8", "--max-new-tokens", "10", "--batch-size", "2"]


def test_cli_measure_end_to_end(tmp_path, tiny_model, capsys):
    args = _cli_measure_args(tmp_path, tiny_model)
    out = tmp_path / "out"
    code = main([*args, "--samplers", "base,top_p=0.9", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"model", "data", "settings", "samplers"}
    base = results["samplers"]["base"]
    for key in ("log_loss", "log_loss_smoothed", "truncated_fraction", "gen_entropy", "entce", "distinct_2",
                "seq_rep_4"):
        assert isinstance(base[key], float)
    assert all(len(base["per_step"][k]) == 10 for k in ("log_loss", "gen_entropy", "count"))
    assert (out / "curves.png").stat().st_size > 10_000
    assert "base" in capsys.readouterr().out
    # Same seed, same numbers.
    main([*args, "--samplers", "base,top_p=0.9", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["samplers"]["base"]["gen_entropy"] == base["gen_entropy"]


def test_cli_measure_resumes_from_its_journal(tmp_path, tiny_model, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [*_cli_measure_args(tmp_path, tiny_model), "--out", str(out)]
    calls = []
    monkeypatch.setattr(measure_module, "measure", lambda *a, **k: calls.append(a[3][0].spec) or measure(*a, **k))
    assert main([*args, "--samplers", "base,top_p=0.9"]) == 0
    assert calls == ["base", "top_p=0.9"] and len((out / "measurements.jsonl").read_text().splitlines()) == 3
    first = json.loads((out / "results.json").read_text())["samplers"]
    # A rerun (say after an interruption) measures only what the journal lacks, with the same numbers.
    calls.clear()
    assert main([*args, "--samplers", "top_p=0.9,base,temperature=0.8"]) == 0
    assert calls == ["temperature=0.8"]
    again = json.loads((out / "results.json").read_text())["samplers"]
    for spec in ("base", "top_p=0.9"):
        assert json.dumps(again[spec], sort_keys=True) == json.dumps(first[spec], sort_keys=True)
    # Other prompts (here: fewer) are another run: its journal is refused, naming the file.
    assert main([*args[:-2], "--num-prompts", "2", "--samplers", "base", "--out", str(out)]) == 2
    assert "measurements.jsonl" in capsys.readouterr().err


def test_cli_measure_interrupted_mid_sampler_resumes_at_its_next_batch(tmp_path, tiny_model, monkeypatch):
    """A sampler's finished batches are kept in OUT/batches.cache/ until the journal holds it: a rerun
    after an interruption runs only the batches it lacked, and gives the numbers of an uninterrupted run."""
    args = [*_cli_measure_args(tmp_path, tiny_model), "--samplers", "top_p=0.9"]  # 3 prompts: 2 batches
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    original, calls = measure_module._measure_batch, []

    def interrupted(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*a, **k)
    out = tmp_path / "out"
    monkeypatch.setattr(measure_module, "_measure_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(out)])
    assert len(list((out / "batches.cache").iterdir())) == 1 and not (out / "results.json").exists()
    monkeypatch.setattr(measure_module, "_measure_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    calls.clear()
    assert main([*args, "--out", str(out)]) == 0
    assert len(calls) == 1 and list((out / "batches.cache").iterdir()) == []
    whole, resumed = (json.loads((tmp_path / d / "results.json").read_text())["samplers"]["top_p=0.9"]
                      for d in ("whole", "out"))
    assert whole.pop("seconds") > 0 and resumed.pop("seconds") > 0
    assert json.dumps(resumed, sort_keys=True) == json.dumps(whole, sort_keys=True)


def test_cli_errors_name_the_argument(tmp_path, capsys):
    assert main(["measure", "--samplers", "nucleus=0.9", "--out", str(tmp_path)]) == 2
    assert "nucleus=0.9" in capsys.readouterr().err
    assert main(["measure", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_measure_integration(smollm):
    from calibrated_sampling.data import load_documents, make_windows

    model, tok = smollm
    windows = make_windows(load_documents("pydoc"), tok, 2, prompt_tokens=32, continuation_tokens=12)
    results = measure(model, tok, windows, ["base", "temperature=0.9"], batch_size=2, progress=False)
    base = results["base"]
    direct = torch.cat([direct_log_loss(model, w) for w in windows]).mean().item()
    assert base["log_loss"] == pytest.approx(direct, abs=1e-4)
    assert 0.5 < base["log_loss"] < 8 and 0.1 < base["gen_entropy"] < 8
    # A lower temperature sharpens q on human text: its entropy there drops.
    assert results["temperature=0.9"]["human_entropy"] < base["human_entropy"]
