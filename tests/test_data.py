import pytest
import torch
from conftest import make_tokenizer, word_text

from calibrated_sampling.data import Document, chunk_text, load_documents, make_windows, split_of


def test_builtin_corpora_need_no_download():
    pydoc = load_documents("pydoc")
    code = load_documents("stdlib-code")
    assert len(pydoc) > 50 and all(d.text for d in pydoc)
    assert len(code) > 50 and any("def " in d.text for d in code)


def test_files_folders_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(30)))
    (tmp_path / "b.md").write_text("short")
    docs = load_documents(str(tmp_path), chunk_chars=500)
    assert len(docs) > 3 and any(d.text == "short" for d in docs)
    assert len(load_documents(str(tmp_path / "*.md"))) == 1
    assert len(load_documents(str(tmp_path / "a.txt"), chunk_chars=10**9)) == 1


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_documents(str(tmp_path / "nope"))


def test_chunks_break_at_paragraphs():
    text = "\n\n".join(["x" * 100] * 10)
    chunks = chunk_text(text, 250)
    assert all(c.count("x") % 100 == 0 for c in chunks)
    assert sum(c.count("x") for c in chunks) == 1000


def test_split_is_deterministic_and_balanced():
    docs = [Document(f"document number {i}", "t") for i in range(2000)]
    sides = [split_of(d.key) for d in docs]
    assert sides == [split_of(d.key) for d in docs]
    assert 0.45 < sides.count("eval") / len(sides) < 0.55


def test_windows_have_exact_lengths_and_respect_the_split():
    tok = make_tokenizer()
    rng = torch.Generator().manual_seed(0)
    docs = [Document(word_text(rng, 40), f"d{i}") for i in range(40)]
    windows = make_windows(docs, tok, 6, prompt_tokens=8, continuation_tokens=12, split="eval")
    assert len(windows) == 6
    assert all(len(w.prompt_ids) == 8 and len(w.continuation_ids) == 12 for w in windows)
    assert all(split_of(w.doc_key) == "eval" for w in windows)
    fit = make_windows(docs, tok, 6, prompt_tokens=8, continuation_tokens=12, split="fit")
    assert not {w.doc_key for w in fit} & {w.doc_key for w in windows}


def test_long_documents_give_several_windows_round_robin():
    tok = make_tokenizer()
    rng = torch.Generator().manual_seed(1)
    docs = [Document(word_text(rng, 100), f"d{i}") for i in range(2)]
    windows = make_windows(docs, tok, 6, prompt_tokens=10, continuation_tokens=10, split=None)
    keys = [w.doc_key for w in windows]
    assert keys[0] != keys[1] and keys[:2] == keys[2:4]  # one window per document, then the next round
    assert windows[0].prompt_ids != windows[2].prompt_ids


def test_too_few_documents_says_how_many_were_dropped():
    tok = make_tokenizer()
    rng = torch.Generator().manual_seed(2)
    docs = [Document(word_text(rng, 30), "long"), Document("w1 w2", "short")]
    with pytest.warns(UserWarning, match="dropped 1 of 2 documents"):
        with pytest.raises(ValueError, match="`num_prompts` is 5"):
            make_windows(docs, tok, 5, prompt_tokens=10, continuation_tokens=10, split=None)
    with pytest.raises(ValueError, match="`prompt_tokens` must be a positive integer, but is 0"):
        make_windows(docs, tok, 1, prompt_tokens=0, split=None)


def test_prompts_start_with_bos_when_the_tokenizer_adds_it():
    from tokenizers import processors

    rng = torch.Generator().manual_seed(0)
    docs = [Document(word_text(rng, 60), "test") for _ in range(6)]
    plain = make_tokenizer()
    with_bos = make_tokenizer()
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                                              special_tokens=[("<bos>", 1)])
    assert with_bos("w1")["input_ids"][0] == 1 and plain("w1")["input_ids"][0] != 1
    a = make_windows(docs, plain, 4, prompt_tokens=8, continuation_tokens=6, split=None)
    b = make_windows(docs, with_bos, 4, prompt_tokens=8, continuation_tokens=6, split=None)
    for x, y in zip(a, b):
        assert 1 not in x.prompt_ids and y.prompt_ids[0] == 1  # only BOS-adding tokenizers get it
        assert len(y.prompt_ids) == 8 and len(y.continuation_ids) == 6
        assert y.prompt_ids[1:] + y.continuation_ids == (x.prompt_ids + x.continuation_ids)[:13]
