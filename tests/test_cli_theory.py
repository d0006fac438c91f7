"""The `theory`, `corpus-exponent` and `scaling` subcommands, end to end on small settings."""

import json
import math

import pytest
import torch
from conftest import EOS_ID, VOCAB, make_tokenizer, word_text
from transformers import LlamaConfig, LlamaForCausalLM

from calibrated_sampling.cli import main
from calibrated_sampling.cli_theory import count_parameters
from calibrated_sampling.theory import fit_entce_scaling

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def sized_model(hidden: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama of a chosen width, peaked like conftest's make_model."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two saved models of different sizes and a text file of words they know."""
    root = tmp_path_factory.mktemp("scaling")
    paths = []
    for hidden in (16, 48):
        path = root / f"llama-h{hidden}"
        sized_model(hidden).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        paths.append(str(path))
    rng = torch.Generator().manual_seed(0)
    (root / "text.txt").write_text("\n\n".join(word_text(rng, 40) for _ in range(8)))
    return paths, str(root / "text.txt")


def scaling_args(models, text, out, *extra):
    return ["scaling", "--models", ",".join(models), "--data", text, "--split", "all", "--num-prompts", "3",
            "--prompt-tokens", "8", "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out), *extra]


def test_theory_prints_the_table_and_writes_json(tmp_path, capsys):
    code = main(["theory", "--exponents", "1.5,2", "--vocab-size", "3k", "--trials", "4", "--seed", "1",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1.500" in printed and "-0.333" in printed and "V = 3,000" in printed
    saved = json.loads((tmp_path / "theory.json").read_text())
    assert [row["a"] for row in saved["rows"]] == [1.5, 2.0]
    assert saved["rows"][1]["predicted"] == pytest.approx(-0.5)
    assert saved["settings"]["vocab_size"] == 3000 and saved["settings"]["seed"] == 1


def test_theory_rejects_a_bad_exponent(capsys):
    assert main(["theory", "--exponents", "1.5,abc", "--vocab-size", "3000", "--trials", "4"]) == 2
    err = capsys.readouterr().err
    assert "--exponents" in err and "abc" in err


def test_corpus_exponent_of_a_zipf_file(tmp_path, capsys):
    path = tmp_path / "zipf.txt"
    path.write_text("the " * 60 + "of " * 30 + "and " * 20 + "\n\n" + "a " * 15)  # frequency ∝ 1 / rank
    assert main(["corpus-exponent", "--data", str(path), "--top", "10"]) == 0
    printed = capsys.readouterr().out
    assert "a = 1.000" in printed and "beta = 1/a - 1 = +0.000" in printed
    assert "125 words" in printed and "4 types" in printed


def test_count_parameters_counts_tied_embeddings_once():
    model = sized_model(16)
    total, non_embedding = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - non_embedding == VOCAB * 16  # one shared (V, H) matrix


def test_scaling_with_explicit_params(two_models, tmp_path, capsys):
    models, text = two_models
    out = tmp_path / "out"
    assert main(scaling_args(models, text, out, "--params", "10M,1e8")) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "scaling.json").read_text())
    rows = saved["models"]
    assert [r["name"] for r in rows] == models
    assert [r["params"] for r in rows] == [1e7, 1e8]
    assert rows[0]["params_counted"] < rows[1]["params_counted"]
    for r in rows:
        assert r["entce"] == pytest.approx(r["gen_entropy"] - r["log_loss"])
        assert math.isfinite(r["entce_stderr"]) and r["non_embedding_params"] < r["params_counted"]
        assert r["num_prompts"] == 3
    fit = fit_entce_scaling([1e7, 1e8], [r["entce"] for r in rows])
    assert saved["fit"]["beta"] == pytest.approx(fit["beta"])
    assert saved["fit"]["fitted"] in ("EntCE", "|EntCE|") and saved["fit"]["note"]
    assert (out / "scaling.png").stat().st_size > 5_000
    for k in range(2):  # the full per-model measurement is kept
        assert len(list((out / "models").glob(f"0{k}-*/results.json"))) == 1
    assert "beta = " in printed and models[1] in printed


def test_scaling_defaults_to_counted_params(two_models, tmp_path):
    models, text = two_models
    out = tmp_path / "out"
    assert main(scaling_args(models, text, out)) == 0
    rows = json.loads((out / "scaling.json").read_text())["models"]
    for path, row in zip(models, rows):
        assert row["params"] == row["params_counted"] == sum(
            p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())


def test_scaling_rejects_params_of_the_wrong_length(two_models, tmp_path, capsys):
    models, text = two_models
    assert main(scaling_args(models, text, tmp_path / "out", "--params", "1e7,1e8,1e9")) == 2
    err = capsys.readouterr().err
    assert "--params" in err and "--models" in err and "1e7,1e8,1e9" in err and models[0] in err
    assert not (tmp_path / "out").exists()  # refused before any model loads
    assert main(["scaling", "--models", models[0], "--out", str(tmp_path / "out")]) == 2
    assert "at least two" in capsys.readouterr().err
