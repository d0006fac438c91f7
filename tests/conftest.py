"""Shared fixtures: a tiny random Llama and a word-level tokenizer, built here (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from calibrated_sampling.models import prepare_tokenizer

VOCAB = 99
EOS_ID = 2


def make_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """Words w0..w95 plus <unk>, <bos>, <eos>; no pad token unless asked (as many LM tokenizers)."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": EOS_ID}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB - 3)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    if with_pad:
        tok.pad_token = "<unk>"
    return tok


def make_model(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    # Larger logits than the random init gives, so that distributions are not all near-uniform.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    model.config.name_or_path = "tiny-random-llama"
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on two busy cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny(tiny_model, tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer, tiny_model)
    return tiny_model, tiny_tokenizer


def word_text(rng: torch.Generator, n: int) -> str:
    """n random words (no <eos>), as human text for the tiny tokenizer."""
    ids = torch.randint(3, VOCAB, (n,), generator=rng).tolist()
    return " ".join(f"w{i - 3}" for i in ids)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (slow tests only); loads from the converted cache after the first time."""
    from calibrated_sampling.models import load_model

    return load_model("smollm2-135m")
