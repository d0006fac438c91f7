"""FutureEntropyHead: shapes, the fused (folded) path, the size budget, save / load and compatibility."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calibrated_sampling.heads import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FutureEntropyHead,
    HeadConfig,
    check_compatible,
    check_weights_digest,
    load_config,
    stamp_weights_digest,
    write_card,
)

H, V = 32, 99


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make_head(family: str = "tied", model=None, tokenizer=None, seed: int = 0, **kwargs) -> FutureEntropyHead:
    """A small head with random (non-zero) weights everywhere, so outputs depend on every part."""
    model = model if model is not None else make_model()
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    # lm_parameters=None: the tiny LM is too small for a 5% budget to hold any MLP.
    config = HeadConfig.for_model(model, tokenizer, family=family, mlp_hidden=16, mlp_layers=2,
                                  lm_parameters=None, **kwargs)
    head = FutureEntropyHead(config, model.get_output_embeddings().weight)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"`family`.*'dense'"):
        HeadConfig(hidden_size=H, vocab_size=V, family="dense")
    with pytest.raises(ValueError, match=r"`hidden_size`.*-3"):
        HeadConfig(hidden_size=-3, vocab_size=V)
    with pytest.raises(ValueError, match=r"`rank`"):
        HeadConfig(hidden_size=H, vocab_size=V, family="tied", rank=8)
    with pytest.raises(ValueError, match=r"`rank`.*0"):
        HeadConfig(hidden_size=H, vocab_size=V, family="lowrank", rank=0)
    with pytest.raises(ValueError, match=r"`calibration`"):
        HeadConfig(hidden_size=H, vocab_size=V, calibration=[1.0])
    assert HeadConfig(hidden_size=H, vocab_size=V, family="lowrank").rank == 64


@pytest.mark.parametrize("family", ["tied", "lowrank"])
def test_shapes_rows_and_zero_horizon(family):
    head = make_head(family, rank=8 if family == "lowrank" else None)
    hidden, horizon = torch.randn(2, 3, H), torch.tensor([[0, 1, 7], [30, 2, 5]])
    full = head(hidden, horizon)  # (2, 3, V)
    assert full.shape == (2, 3, V)
    assert torch.all(full[0, 0] == 0)  # nothing left to generate: F_0 = 0
    token = torch.randint(0, V, (6,))
    rows = head.predict_rows(hidden.reshape(6, H), token, horizon.reshape(6))
    torch.testing.assert_close(rows, full.reshape(6, V)[torch.arange(6), token])


def test_tied_head_keeps_the_lm_embedding_out_of_its_parameters():
    model = make_model()
    head = make_head(model=model)
    assert "output_embedding" not in head.state_dict()
    assert all(p is not model.get_output_embeddings().weight for p in head.parameters())
    assert not head.output_embedding.requires_grad
    bare = FutureEntropyHead(head.config)
    with pytest.raises(RuntimeError, match="attach_output_embedding"):
        bare(torch.randn(1, H), torch.tensor([3]))
    with pytest.raises(ValueError, match="shape"):
        bare.attach_output_embedding(torch.randn(V, H + 1))


@pytest.mark.parametrize("per_row", [False, True])
def test_fused_path_equals_exact_path(tiny, per_row):
    model, tokenizer = tiny
    head = make_head(model=model, tokenizer=tokenizer)
    ids = torch.randint(3, V, (4, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden, lm_logits = out.hidden_states[-1][:, -1], out.logits[:, -1]  # (4, H), (4, V)
        horizon = torch.tensor([0, 3, 17, 120])
        a = torch.tensor([1.0, 1.1, 0.9, 1.3]) if per_row else 1.05
        b = torch.tensor([0.0, 0.2, -0.1, 0.05]) if per_row else 0.04
        exact = torch.log_softmax(head.calibrated_logits(hidden, horizon, lm_logits, a, b), dim=-1)
        fused = torch.log_softmax(head.fused_logits(hidden, horizon, a, b), dim=-1)
        # The folded hidden state goes through the LM's own output layer.
        via_lm = model.get_output_embeddings()(head.calibrated_hidden(hidden, horizon, a, b))
        via_lm = torch.log_softmax(via_lm + head.calibrated_bias(horizon, a, b), dim=-1)
    torch.testing.assert_close(fused, exact)
    torch.testing.assert_close(via_lm, exact)


def test_fused_path_with_an_output_bias():
    torch.manual_seed(1)
    weight, bias = torch.randn(V, H), torch.randn(V)
    head = FutureEntropyHead(HeadConfig(hidden_size=H, vocab_size=V, mlp_hidden=16), weight, bias)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
        hidden, horizon = torch.randn(5, H), torch.tensor([1, 2, 3, 4, 50])
        exact = torch.log_softmax(head.calibrated_logits(hidden, horizon, hidden @ weight.T + bias, 1.2, 0.1), -1)
        fused = torch.log_softmax(head.fused_logits(hidden, horizon, 1.2, 0.1), -1)
    torch.testing.assert_close(fused, exact)


def test_lowrank_does_not_fold():
    head = make_head("lowrank", rank=4)
    with pytest.raises(ValueError, match="tied"):
        head.fused_logits(torch.randn(2, H), torch.tensor([1, 2]), 1.0, 0.1)


def test_size_budget_at_smollm_scale():
    lm_parameters = 134_515_008  # SmolLM2-135M
    tied = FutureEntropyHead(HeadConfig(hidden_size=576, vocab_size=49152, lm_parameters=lm_parameters))
    lowrank = FutureEntropyHead(HeadConfig(hidden_size=576, vocab_size=49152, family="lowrank", rank=64,
                                           lm_parameters=lm_parameters))
    assert tied.num_parameters() <= 0.05 * lm_parameters
    assert lowrank.num_parameters() <= 0.05 * lm_parameters
    with pytest.raises(ValueError, match="lm_parameters"):
        FutureEntropyHead(HeadConfig(hidden_size=576, vocab_size=49152, mlp_hidden=4096, mlp_layers=3,
                                     lm_parameters=lm_parameters))


@pytest.mark.parametrize("family", ["tied", "lowrank"])
def test_save_load_round_trip(tmp_path, tiny, family):
    model, tokenizer = tiny
    head = make_head(family, model=model, tokenizer=tokenizer, rank=8 if family == "lowrank" else None,
                     label_settings={"kind": "rollout", "horizon": 16}, calibration={"a": [1.0, 0.9], "b": [0.1, 0.0]})
    head.save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    loaded = FutureEntropyHead.from_pretrained(tmp_path, model=model, tokenizer=tokenizer)
    assert loaded.config.to_dict() == head.config.to_dict()
    hidden, horizon = torch.randn(3, H), torch.tensor([1, 8, 64])
    torch.testing.assert_close(loaded(hidden, horizon), head(hidden, horizon), rtol=0, atol=0)


def _other_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{f"x{i}": i + 3 for i in range(V - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def test_loading_against_another_model_is_an_error(tmp_path, tiny):
    model, tokenizer = tiny
    make_head(model=model, tokenizer=tokenizer).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`vocab_size`: head 99, model 120"):
        FutureEntropyHead.from_pretrained(tmp_path, model=make_model(vocab=120), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"`tokenizer_fingerprint`: head '[0-9a-f]+', tokenizer '[0-9a-f]+'"):
        FutureEntropyHead.from_pretrained(tmp_path, model=model, tokenizer=_other_tokenizer())
    renamed = make_model()
    renamed.config.name_or_path = "someone/else"
    with pytest.raises(ValueError, match=r"`base_model`: head 'tiny-random-llama', model 'someone/else'"):
        FutureEntropyHead.from_pretrained(tmp_path, model=renamed, tokenizer=tokenizer)
    FutureEntropyHead.from_pretrained(tmp_path, model=renamed, tokenizer=tokenizer, check_base_model=False)
    wider = HeadConfig(**{**load_config(tmp_path).to_dict(), "hidden_size": 48})
    with pytest.raises(ValueError, match=r"`hidden_size`: head 48, model 32"):
        check_compatible(wider, model, tokenizer)


def test_missing_and_corrupt_files(tmp_path, tiny):
    model, tokenizer = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FutureEntropyHead.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        FutureEntropyHead.from_pretrained(tmp_path)
    head = make_head(model=model, tokenizer=tokenizer)
    head.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        FutureEntropyHead.from_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        FutureEntropyHead.from_pretrained(tmp_path)
    head.save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**record, "mlp_hidden": 24}))
    with pytest.raises(ValueError, match="does not match"):
        FutureEntropyHead.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**record, "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        FutureEntropyHead.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FutureEntropyHead.from_pretrained(tmp_path)


def test_config_records_the_digest_of_its_weights(tmp_path, tiny):
    model, tokenizer = tiny
    make_head(model=model, tokenizer=tokenizer).save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / CONFIG_NAME).read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert "weights_sha256" not in load_config(tmp_path).to_dict()  # a record of the folder, not of the config


def test_weights_of_another_head_of_the_same_shapes_are_refused(tmp_path, tiny):
    model, tokenizer = tiny
    make_head(model=model, tokenizer=tokenizer, seed=0).save_pretrained(tmp_path / "one")
    make_head(model=model, tokenizer=tokenizer, seed=1).save_pretrained(tmp_path / "two")
    digests = {name: hashlib.sha256((tmp_path / name / WEIGHTS_NAME).read_bytes()).hexdigest() for name in ("one", "two")}
    shutil.copy(tmp_path / "two" / WEIGHTS_NAME, tmp_path / "one" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'one'}.*{digests['two']}.*{digests['one']}.*force=True"):
        FutureEntropyHead.from_pretrained(tmp_path / "one", model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="force=True"):  # stamping does not bless a swap by accident
        stamp_weights_digest(tmp_path / "one")
    assert stamp_weights_digest(tmp_path / "one", force=True) == digests["two"]
    FutureEntropyHead.from_pretrained(tmp_path / "one", model=model, tokenizer=tokenizer)


def test_a_folder_without_the_digest_is_refused_until_stamped(tmp_path, tiny):
    model, tokenizer = tiny
    head = make_head(model=model, tokenizer=tokenizer, calibration={"a": [1.0], "b": [0.1]})
    head.save_pretrained(tmp_path)
    stamped = (tmp_path / CONFIG_NAME).read_text()
    record = json.loads(stamped)
    del record["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ValueError, match=r"records no `weights_sha256`.*stamp_weights_digest\("):
        FutureEntropyHead.from_pretrained(tmp_path, model=model, tokenizer=tokenizer)
    stamp_weights_digest(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_text() == stamped  # only the digest line was added
    loaded = FutureEntropyHead.from_pretrained(tmp_path, model=model, tokenizer=tokenizer)
    assert loaded.config.to_dict() == head.config.to_dict()


def test_save_calibration_keeps_the_digest_and_refuses_other_weights(tmp_path, tiny):
    from calibrated_sampling.calibrator import constant_calibration
    from calibrated_sampling.fit import save_calibration

    model, tokenizer = tiny
    make_head(model=model, tokenizer=tokenizer).save_pretrained(tmp_path)
    before = json.loads((tmp_path / CONFIG_NAME).read_text())["weights_sha256"]
    save_calibration(tmp_path, constant_calibration(0.9, 0.1, 8))
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["weights_sha256"] == before
    assert FutureEntropyHead.from_pretrained(tmp_path, model=model, tokenizer=tokenizer).config.calibration["a"] == [0.9]
    make_head(model=model, tokenizer=tokenizer, seed=5).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="come from another head"):
        save_calibration(tmp_path, constant_calibration(1.0, 0.0, 8))


@pytest.mark.parametrize("folder", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "heads").iterdir()
                                          if (p / CONFIG_NAME).is_file()))
def test_shipped_heads_record_the_digest_of_their_weights(folder):
    directory = Path(__file__).resolve().parents[1] / "heads" / folder
    file_format = json.loads((directory / CONFIG_NAME).read_text())["format"]  # heads and state-value heads
    check_weights_digest(directory, file_format=file_format)


def test_write_card(tmp_path):
    path = write_card(tmp_path / "head", "# A head\n\nTrained on nothing.")
    assert path.read_text() == "# A head\n\nTrained on nothing.\n"
