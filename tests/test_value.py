"""The state-value head: its form, its folder (round trip, refusals), and its training on label rows."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import VOCAB, make_model, make_tokenizer

from calibrated_sampling.data import Window
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.labels import make_labels
from calibrated_sampling.train import evaluate_head, train_head
from calibrated_sampling.value import FORMAT, StateValueHead, ValueConfig
from calibrated_sampling.value_train import load_value_rows, train_value_head


def random_value(model, tokenizer=None, seed=0, **kwargs) -> StateValueHead:
    """A value head whose output depends on h (a fresh one starts at a constant rate)."""
    torch.manual_seed(seed)
    value = StateValueHead(ValueConfig.for_model(model, tokenizer, mlp_hidden=16, max_horizon=12, **kwargs))
    with torch.no_grad():
        torch.nn.init.normal_(value.out.weight, std=0.5)
    value.set_rate(1.5)
    return value.eval()


def test_value_is_a_rate_times_the_horizon(tiny):
    model, tok = tiny
    value = random_value(model, tok)
    hidden = torch.randn(5, 32)
    assert torch.equal(value(hidden, 0), torch.zeros(5))  # V_0 = 0: nothing left to generate
    k = torch.tensor([1, 2, 3, 7, 12])
    assert value(hidden, k).shape == (5,)
    torch.testing.assert_close(value.predict_rows(hidden, torch.zeros(5, dtype=torch.long), k), value(hidden, k))
    # The same state and horizon give the same value; rows of a batch may differ in the last bit on some CPUs.
    twin = value(hidden[0].expand(2, 32), torch.tensor([3, 3]))
    torch.testing.assert_close(twin[0], twin[1])
    with pytest.raises(ValueError, match="`mlp_hidden` must be a positive integer, but is 0"):
        ValueConfig(hidden_size=32, vocab_size=99, mlp_hidden=0)
    with pytest.raises(ValueError, match="more than 5%"):
        StateValueHead(ValueConfig(hidden_size=32, vocab_size=99, lm_parameters=1000))


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    value = random_value(model, tok, label_settings={"kind": "returns"})
    value.save_pretrained(tmp_path / "v")
    record = json.loads((tmp_path / "v" / "config.json").read_text())
    assert record["format"] == FORMAT
    assert record["weights_sha256"] == hashlib.sha256((tmp_path / "v" / "head.safetensors").read_bytes()).hexdigest()
    loaded = StateValueHead.from_pretrained(tmp_path / "v", model, tok)
    assert loaded.config.to_dict() == value.config.to_dict()
    assert loaded.config.base_model == "tiny-random-llama" and loaded.config.tokenizer_fingerprint
    hidden, k = torch.randn(4, 32), torch.tensor([0, 1, 5, 11])
    torch.testing.assert_close(loaded(hidden, k), value(hidden, k), rtol=0, atol=0)


def test_refused_for_another_model_and_for_other_weights(tiny, tmp_path):
    model, tok = tiny
    random_value(model, tok, seed=0).save_pretrained(tmp_path / "a")
    random_value(model, tok, seed=1).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="another model: `vocab_size`: head 99, model 50"):
        StateValueHead.from_pretrained(tmp_path / "a", make_model(vocab=50))
    renamed = make_model()
    renamed.config.name_or_path = "other-llama"
    with pytest.raises(ValueError, match="`base_model`"):
        StateValueHead.from_pretrained(tmp_path / "a", renamed)
    StateValueHead.from_pretrained(tmp_path / "a", renamed, check_base_model=False)  # a renamed copy, on request
    other_tokenizer = make_tokenizer()
    other_tokenizer.add_tokens(["extra"])
    with pytest.raises(ValueError, match="`tokenizer_fingerprint`"):
        StateValueHead.from_pretrained(tmp_path / "a", model, other_tokenizer)
    # b's weights under a's config: same shapes, other head; the recorded digest refuses them.
    shutil.copy(tmp_path / "b" / "head.safetensors", tmp_path / "a" / "head.safetensors")
    with pytest.raises(ValueError, match="has sha256 .* but config.json was written for weights with sha256"):
        StateValueHead.from_pretrained(tmp_path / "a", model)
    # A future-entropy head folder is not a value folder (and the other way round).
    head = FutureEntropyHead(HeadConfig.for_model(model, tok, mlp_hidden=8), model.get_output_embeddings().weight)
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="not a calibrated-sampling-value config"):
        StateValueHead.from_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="not a calibrated-sampling-head config"):
        FutureEntropyHead.from_pretrained(tmp_path / "b")


def synthetic_rows(n, seed):
    """Rows whose target is a context-dependent rate times the horizon, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 32, generator=gen)
    horizon = torch.randint(0, 13, (n,), generator=gen)
    rate = 2.0 + torch.tanh(hidden[:, 0] + hidden[:, 1])
    target = horizon * rate + 0.3 * horizon.sqrt() * torch.randn(n, generator=gen)
    return {"hidden": hidden, "token": torch.zeros(n, dtype=torch.long), "horizon": horizon, "target": target,
            "context_id": torch.arange(n), "context_entropy": torch.rand(n, generator=gen)}


def test_training_lowers_the_loss_on_synthetic_rows(tiny, tmp_path, one_thread):
    model, tok = tiny
    torch.manual_seed(0)
    value = StateValueHead(ValueConfig.for_model(model, tok, mlp_hidden=32, max_horizon=12, lm_parameters=None))
    train, val = synthetic_rows(2048, 0), synthetic_rows(512, 1)
    before = evaluate_head(value, val)["loss"]
    result = train_head(value, train, val_rows=val, epochs=6, batch_size=64, lr=3e-3, out_dir=tmp_path / "run",
                        progress=False)
    after = result.metrics
    assert after["loss"] < 0.5 * before
    assert after["r2"] > after["baseline_r2"] + 0.05  # it learned the context's rate, beyond the baseline
    loaded = StateValueHead.from_pretrained(result.head_dir, model, tok)
    torch.testing.assert_close(loaded(val["hidden"], val["horizon"]), result.head(val["hidden"], val["horizon"]))


def label_windows(n=6, prompt=5, steps=8):
    ids = torch.randint(3, VOCAB, (n, prompt + steps), generator=torch.Generator().manual_seed(0)).tolist()
    return [Window(tuple(row[:prompt]), tuple(row[prompt:]), f"doc{i}", "test") for i, row in enumerate(ids)]


def test_value_trains_on_returns_rows_with_td_targets(tiny, tmp_path, one_thread):
    model, tok = tiny
    windows = label_windows()
    make_labels(model, tok, windows, "returns", tmp_path / "returns", max_new_tokens=8, batch_size=3, progress=False)
    make_labels(model, tok, windows, "teacher-forced", tmp_path / "tf", max_new_tokens=8, batch_size=3,
                progress=False)
    with pytest.raises(ValueError, match="holds 'teacher-forced' rows; a state value trains on returns rows only"):
        load_value_rows([tmp_path / "returns", tmp_path / "tf"])
    mc, _, _ = load_value_rows([tmp_path / "returns"], model=model, val_fraction=0.0)
    value = random_value(model, tok)
    td, _, _ = load_value_rows([tmp_path / "returns"], model=model, val_fraction=0.0, td_n=2, td_lambda=0.5,
                               value=value)
    assert torch.equal(mc["hidden"], td["hidden"]) and torch.equal(mc["horizon"], td["horizon"])
    assert not torch.allclose(mc["target"], td["target"])  # bootstrapped from V, not the Monte Carlo return
    result, report = train_value_head([tmp_path / "returns"], model, tok, tmp_path / "out", td_n=2, td_lambda=0.5,
                                      val_fraction=0.3, mlp_hidden=16, epochs=2, batch_size=8, progress=False)
    loaded = StateValueHead.from_pretrained(result.head_dir, model, tok)
    settings = loaded.config.label_settings
    assert settings["td_n"] == 2 and settings["folders"][0]["kind"] == "returns"
    assert loaded.config.max_horizon == 8  # the labels' T
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train_rows"] == report["train_rows"] > 0
