import json
import shutil

import pytest
import torch
from conftest import make_tokenizer

from calibrated_sampling import models
from calibrated_sampling.models import (
    _cache_is_valid,
    _sha256,
    load_model,
    model_fingerprint,
    resolve_model_path,
    tokenizer_fingerprint,
)


def fake_cache(folder, payload=b"weights"):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    record = {"source": "x", "sha256": {"model.safetensors": _sha256(folder / "model.safetensors")}}
    (folder / models._MANIFEST).write_text(json.dumps(record))


def test_cache_is_valid_only_with_a_matching_manifest(tmp_path):
    fake_cache(tmp_path / "ok")
    assert _cache_is_valid(tmp_path / "ok")
    fake_cache(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"weighXs")
    assert not _cache_is_valid(tmp_path / "corrupt")
    fake_cache(tmp_path / "partial")
    (tmp_path / "partial" / models._MANIFEST).unlink()  # a conversion that died before its last write
    assert not _cache_is_valid(tmp_path / "partial")
    fake_cache(tmp_path / "garbled")
    (tmp_path / "garbled" / models._MANIFEST).write_text("{not json")
    assert not _cache_is_valid(tmp_path / "garbled")


def test_missing_paths_and_packages_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        resolve_model_path(str(tmp_path / "nothing.gguf"))
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    monkeypatch.setitem(models.ALIASES, "ghost", models.Alias("no_such_package_xyz", "pip install ghost", "g.gguf", "g"))
    monkeypatch.setenv("CALIBRATED_SAMPLING_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModuleNotFoundError, match="pip install ghost"):
        resolve_model_path("ghost")


def test_load_local_directory_sets_pad_and_left_padding(tmp_path, tiny_model):
    tok = make_tokenizer()
    tiny_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    assert not any(p.requires_grad for p in model.parameters())
    assert model_fingerprint(model) == {"base_model": str(tmp_path), "hidden_size": 32, "vocab_size": 99}
    with pytest.raises(ValueError, match="`dtype` must be one of .* but is 'float8'"):
        load_model(str(tmp_path), dtype="float8")


def test_tokenizer_fingerprint_tells_vocabularies_apart():
    a, b = make_tokenizer(), make_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["extra"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


@pytest.mark.slow
def test_corrupt_alias_cache_is_rebuilt(tmp_path, monkeypatch, smollm):
    good, _ = resolve_model_path("smollm2-135m")  # the real cache (built by the session fixture)
    monkeypatch.setenv("CALIBRATED_SAMPLING_CACHE", str(tmp_path))
    copy = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(good, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as handle:  # flip bytes in the middle of the weights
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00" * 64)
    assert not _cache_is_valid(copy)
    path, _ = resolve_model_path("smollm2-135m")  # detected and converted again from the GGUF
    assert _cache_is_valid(copy) and path == str(copy)
    model, _ = load_model("smollm2-135m")
    torch.testing.assert_close(model.get_output_embeddings().weight, smollm[0].get_output_embeddings().weight)
