"""Human text: documents, prompt / continuation windows, and a deterministic fit / eval split.

A document spec is one of
- ``pydoc``: prose from the standard library's ``pydoc_data.topics`` (every Python has it);
- ``stdlib-code``: the standard library's own ``.py`` files;
- a file, a folder (its ``*.txt``, ``*.md``, ``*.rst`` and ``*.py`` files) or a glob;
- ``wikitext-103``, ``writingprompts``, ``codecontests``: the paper's data sets, through the
  optional ``datasets`` package, for users who can reach a hub.
Long files (a novel) are cut at paragraph boundaries into documents of about ``chunk_chars``
characters, so that one book gives many prompts and the fit / eval split can fall between chapters.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

BUILTIN = ("pydoc", "stdlib-code")
DATASETS = {  # name -> (hub id, config, split, text field)
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "test", "text"),
    "writingprompts": ("euclaise/writingprompts", None, "test", "story"),
    "codecontests": ("deepmind/code_contests", None, "test", "description"),
}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
CHUNK_CHARS = 8000  # ~2000 tokens of English: room for a 128-token prompt and a 1024-token continuation


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # where it came from: "pydoc:topic", a file path plus chunk index, ...

    @property
    def key(self) -> str:
        """A stable id: the hash of the text, which also decides the fit / eval split."""
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Window:
    """One prompt and the human continuation that follows it, as token ids."""

    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    doc_key: str
    source: str


def split_of(doc_key: str, eval_fraction: float = 0.5) -> str:
    """``"fit"`` or ``"eval"`` from the document hash: stable across runs, machines and orderings."""
    return "eval" if int(doc_key[:8], 16) / 0xFFFFFFFF < eval_fraction else "fit"


def windows_digest(windows) -> str:
    """A short sha256 of the token ids of ``windows`` (prompts and continuations, in order)."""
    payload = json.dumps([[list(w.prompt_ids), list(w.continuation_ids)] for w in windows])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut text at blank lines into pieces of at least ``chunk_chars`` characters (the last may be shorter)."""
    chunks, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip():
            continue
        current.append(paragraph.strip())
        size += len(paragraph)
        if size >= chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(text, f"pydoc:{name}") for name, text in sorted(topics.items())]


def _stdlib_code_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return [Document(p.read_text(encoding="utf-8", errors="replace"), f"stdlib:{p.name}") for p in files]


UNDECODABLE_SHARE = 0.01  # bytes a text file may hold that are not UTF-8 (a stray byte of another encoding)


def _read_text(path: Path) -> str:
    """A file's UTF-8 text; a file that is not text (NUL bytes, or more than 1% undecodable bytes) is
    refused, naming it: its bytes would otherwise be measured as if they were prose."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") / max(len(data), 1)
    nul = data.count(0)
    if nul or undecodable > UNDECODABLE_SHARE:
        raise ValueError(f"`data` file {path} is not UTF-8 text ({nul} NUL bytes, {undecodable:.1%} of its bytes "
                         "do not decode): give text files, or convert it to UTF-8 first")
    return text


def _file_documents(paths: list[Path], chunk_chars: int) -> list[Document]:
    docs = []
    for path in paths:
        text = _read_text(path)
        if path.suffix == ".py":  # code: one file, one document (blank lines are not chapter breaks)
            docs.append(Document(text, str(path)))
        else:
            docs.extend(Document(c, f"{path}#{i}") for i, c in enumerate(chunk_text(text, chunk_chars)))
    return docs


def _dataset_documents(name: str) -> list[Document]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"`data` {name!r} needs the optional `datasets` package: "
                          "pip install 'calibrated-sampling[datasets]'") from error
    hub_id, config, split, field = DATASETS[name]
    rows = datasets.load_dataset(hub_id, config, split=split)
    if name == "wikitext-103":  # articles are split into lines; rejoin them at article headings
        articles = re.split(r"\n(?= = [^=])", "".join(rows[field]))
        return [Document(a, f"{name}:{i}") for i, a in enumerate(articles) if a.strip()]
    return [Document(text, f"{name}:{i}") for i, text in enumerate(rows[field]) if text and text.strip()]


def load_documents(spec: str, chunk_chars: int = CHUNK_CHARS) -> list[Document]:
    """Documents for a spec (see the module docstring), in a fixed order."""
    if spec == "pydoc":
        return _pydoc_documents()
    if spec == "stdlib-code":
        return _stdlib_code_documents()
    if spec in DATASETS:
        return _dataset_documents(spec)
    if not spec.strip():  # Path("") is the working directory: every text file under it would be read
        raise ValueError(f"`data` must name a corpus, file, folder or glob, but is {spec!r}")
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_documents([path], chunk_chars)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"`data` folder {spec!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return _file_documents(files, chunk_chars)
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if os.path.isfile(p))
    if matches:
        return _file_documents(matches, chunk_chars)
    raise FileNotFoundError(
        f"`data` {spec!r} is not a built-in corpus ({', '.join(BUILTIN + tuple(DATASETS))}) "
        "nor an existing file, folder or glob")


def _leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id when the tokenizer puts it in front of every text by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def make_windows(
    documents: list[Document],
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    prompt_tokens: int = 128,
    continuation_tokens: int = 256,
    split: str | None = "eval",
    eval_fraction: float = 0.5,
    strict: bool = True,
) -> list[Window]:
    """``num_prompts`` windows of ``prompt_tokens`` prompt and ``continuation_tokens`` human tokens.

    Documents are taken in the order of their hash (a fixed pseudo-random order, so a small run
    samples the whole corpus rather than its first file), from one side of the fit / eval split
    (``split=None`` takes both). Each document gives its first window before any document gives a
    second one (consecutive, non-overlapping), so short corpora still yield many prompts without
    one long document dominating. Documents too short for one window are dropped with a warning.

    Raises:
        ValueError: when the documents hold fewer windows than ``num_prompts`` (unless
            ``strict=False``, which returns what there is).
    """
    for name, value in (("num_prompts", num_prompts), ("prompt_tokens", prompt_tokens),
                        ("continuation_tokens", continuation_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    if split not in (None, "fit", "eval"):
        raise ValueError(f"`split` must be 'fit', 'eval' or None, but is {split!r}")
    need = prompt_tokens + continuation_tokens
    pool = sorted({d.key: d for d in documents}.values(), key=lambda d: d.key)
    if split is not None:
        pool = [d for d in pool if split_of(d.key, eval_fraction) == split]
    token_ids = tokenizer([d.text for d in pool], add_special_tokens=False)["input_ids"] if pool else []
    # Models whose tokenizer starts every text with BOS (Gemma) degrade badly without it: such prompts
    # begin with BOS and one text token fewer, so a window still holds `need` tokens in all.
    bos = _leading_bos(tokenizer)
    lead = () if bos is None else (bos,)
    text_need = need - len(lead)
    usable = [(doc, ids) for doc, ids in zip(pool, token_ids) if len(ids) >= text_need]
    windows = []
    cut = prompt_tokens - len(lead)  # text tokens in a prompt
    for k in range(max((len(ids) // text_need for _, ids in usable), default=0)):
        for doc, ids in usable:
            if len(windows) == num_prompts:
                break
            if len(ids) >= (k + 1) * text_need:
                start = k * text_need
                windows.append(Window(lead + tuple(ids[start:start + cut]), tuple(ids[start + cut:start + text_need]),
                                      doc.key, f"{doc.source}@{start}"))
    side = f" in the {split!r} split" if split else ""
    if len(usable) < len(pool):
        warnings.warn(f"dropped {len(pool) - len(usable)} of {len(pool)} documents{side} shorter than "
                      f"prompt_tokens + continuation_tokens = {need} tokens", stacklevel=2)
    if len(windows) < num_prompts and strict:
        raise ValueError(
            f"`num_prompts` is {num_prompts}, but the {len(usable)} documents{side} with at least {need} tokens "
            f"hold only {len(windows)} windows ({len(pool) - len(usable)} documents too short); lower "
            "num_prompts or the token counts, or add text")
    return windows


# ----------------------------------------------------------------------------------------------------
# Windows as model input


def cut_windows(windows: Sequence[Window], steps: int, name: str = "windows") -> list[Window]:
    """``windows`` with their continuations cut to the first ``steps`` human tokens; a window with
    fewer is an error that names it (``name``: the argument the windows came in)."""
    short = [i for i, w in enumerate(windows) if len(w.continuation_ids) < steps]
    if short:
        raise ValueError(f"`max_new_tokens` is {steps}, but {name}[{short[0]}] has only "
                         f"{len(windows[short[0]].continuation_ids)} human continuation tokens")
    return [dataclasses.replace(w, continuation_ids=tuple(w.continuation_ids[:steps])) for w in windows]


def batch_windows(windows: list[Window], pad_id: int, with_continuation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts (optionally followed by their continuations) into (B, L) ids and mask."""
    rows = [list(w.prompt_ids) + (list(w.continuation_ids) if with_continuation else []) for w in windows]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return ids, mask


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) of a left-padded batch from its 2D attention mask: each row counts its real
    tokens from 0, as ``generate()`` does, so that padding does not shift a prompt's positions (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
