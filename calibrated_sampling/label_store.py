"""Label folders on disk: shards of token ids and targets (small, committed) plus a hidden-state cache.

A label folder holds ``manifest.json``, ``shard-00000.safetensors``, ... and, beside each shard, a
cache ``hidden-00000.safetensors`` of the LM's hidden states for its rows. The shards carry what the
labelling run measured and nothing a forward pass can recompute: tokens, targets, entropies, and the
token ids of every sequence the rows lie on (``windows.ids``). The hidden states are a function of
those ids and the model, so they are a cache: tens of MB per folder, written during labelling, never
committed, and rebuilt by one teacher-forced pass per shard when missing, corrupt, or made for
another shard (:func:`load_labels` with ``model=``).

Integrity. The manifest records the sha256 of every shard; a shard whose bytes differ is an error,
never read. A cache records, in its safetensors metadata, the sha256 of the shard it belongs to and
of its own tensor bytes; one that fails either check is rebuilt (or reported, without a model).
Rebuilding refuses a model other than the one the labels were made with (:func:`check_labels_match`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .data import Window, batch_windows, left_padded_positions
from .files import read_json, write_atomic
from .models import model_fingerprint, weights_digest

FORMAT = "calibrated-sampling-labels"
FORMAT_VERSION = 2  # 2: hidden states moved out of the shards into a rebuildable cache
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:05d}.safetensors"
HIDDEN_NAME = "hidden-{:05d}.safetensors"
HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WINDOWS = "windows."  # per-window keys of one shard (length W), not concatenated across shards


class CorruptShardError(ValueError):
    """A label shard is missing or does not match the checksum its manifest recorded."""


class MissingHiddenError(FileNotFoundError):
    """A shard's hidden-state cache is missing or invalid, and no model was given to rebuild it."""


def write_manifest(directory: Path, manifest: dict) -> None:
    write_atomic(directory / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a label folder (settings, counts, shards)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a label folder: it has no {MANIFEST}")
    manifest = read_json(path, "label manifest")  # a damaged one is named, not a bare JSONDecodeError
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a calibrated-sampling label manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has label format version {manifest.get('version')}, this library reads "
                         f"version {FORMAT_VERSION}")
    return manifest


def load_shard(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """Read a shard once, check those very bytes against the manifest's sha256, then parse them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptShardError(f"label shard {path} is missing (the manifest lists it)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CorruptShardError(f"label shard {path} is corrupt: sha256 {digest[:16]}... differs from the "
                                f"{sha256[:16]}... its manifest recorded; delete the folder and relabel")
    return load_safetensors(data)


def iter_shards(directory: str | os.PathLike) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the shards of a label folder in order (without hidden states), each verified."""
    directory = Path(directory)
    for entry in read_manifest(directory)["shards"]:
        yield load_shard(directory / entry["file"], entry["sha256"])


# ----------------------------------------------------------------------------------------------------
# The hidden-state cache


def _payload(data: bytes) -> tuple[dict, bytes]:
    """(metadata, tensor bytes) of a serialised safetensors file."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return header.get("__metadata__", {}), data[8 + size:]


def write_hidden(directory: Path, batch: int, hidden: torch.Tensor, shard_sha256: str) -> None:
    """Write the cache of shard ``batch``, tied to that shard's checksum and checksummed itself."""
    tensors = {"hidden": hidden.contiguous()}
    digest = hashlib.sha256(_payload(save_safetensors(tensors))[1]).hexdigest()
    write_atomic(directory / HIDDEN_NAME.format(batch),
                 save_safetensors(tensors, metadata={"shard_sha256": shard_sha256, "hidden_sha256": digest}))


def read_hidden(directory: Path, entry: dict) -> tuple[torch.Tensor | None, str]:
    """(the cached hidden states of a shard, "") or (None, why the cache cannot be used)."""
    path = directory / HIDDEN_NAME.format(entry["batch"])
    if not path.is_file():
        return None, f"{path.name} is missing"
    data = path.read_bytes()
    try:
        metadata, payload = _payload(data)
        hidden = load_safetensors(data)["hidden"]
    except Exception as error:  # a truncated or overwritten file: any parse error means "rebuild"
        return None, f"{path.name} does not parse ({type(error).__name__})"
    if metadata.get("shard_sha256") != entry["sha256"]:
        return None, f"{path.name} belongs to another version of {entry['file']}"
    if hashlib.sha256(payload).hexdigest() != metadata.get("hidden_sha256"):
        return None, f"{path.name} is corrupt (checksum mismatch)"
    if len(hidden) != entry["rows"]:
        return None, f"{path.name} has {len(hidden)} rows, the shard {entry['rows']}"
    return hidden, ""


def check_labels_match(manifest: dict, model: PreTrainedModel) -> None:
    """Refuse labels made with another LM (other sizes, name or weights): their hidden states and
    entropies would be meaningless to a head for ``model``."""
    recorded = manifest["settings"].get("model", {})
    found = {**model_fingerprint(model), "weights": weights_digest(model)}
    differences = [f"`{k}`: labels {recorded.get(k)!r}, model {v!r}" for k, v in found.items()
                   if recorded.get(k) not in (None, "") and recorded.get(k) != v]
    if differences:
        raise ValueError("the labels were made with another model: " + "; ".join(differences))


def window_ids(prompts: list[tuple[int, ...]], continuations: torch.Tensor) -> torch.Tensor:
    """(W, L) ids of prompt + continuation per window, left-padded with -1 (prompts may differ in length)."""
    rows = [list(p) + continuations[i].tolist() for i, p in enumerate(prompts)]
    ids = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, ids.shape[1] - len(row):] = torch.tensor(row)
    return ids


@torch.no_grad()
def rebuild_hidden(model: PreTrainedModel, shard: dict[str, torch.Tensor], first_window: int, steps: int,
                   pad_token_id: int, batch_size: int = 8) -> torch.Tensor:
    """The hidden state of every row of a shard, by a teacher-forced pass over its windows' token ids.

    A row at step t of window w was labelled after prompt(w) + the first t continuation tokens; its
    state is the decoder output at the last of those positions, the input of the output embedding that
    predicted token t (as ``generate()`` saw it during labelling, up to float rounding).
    """
    ids = shard[WINDOWS + "ids"]
    window = shard["context_id"] // steps - first_window  # (N,) index into this shard's windows
    step = shard["context_id"] % steps
    hidden = torch.zeros(len(window), model.get_output_embeddings().in_features)
    decoder, device = model.get_decoder(), model.device
    for lo in range(0, len(ids), batch_size):
        chunk = [row[row >= 0].tolist() for row in ids[lo:lo + batch_size]]
        padded, mask = batch_windows([Window(tuple(r[:-steps]), tuple(r[-steps:]), "", "") for r in chunk],
                                     pad_token_id, with_continuation=True)
        padded, mask = padded.to(device), mask.to(device)
        states = decoder(input_ids=padded, attention_mask=mask, position_ids=left_padded_positions(mask),
                         use_cache=False).last_hidden_state.float().cpu()  # (B, L, H)
        mine = ((window >= lo) & (window < lo + len(chunk))).nonzero().squeeze(-1)
        start = padded.shape[1] - steps  # index of the first continuation token
        hidden[mine] = states[window[mine] - lo, start + step[mine] - 1]
    return hidden


def load_labels(directory: str | os.PathLike, model: PreTrainedModel | None = None, *,
                hidden: bool = True, pad_token_id: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """All shards of a label folder, verified and concatenated (rows along dim 0, ``samples.*`` likewise),
    with ``hidden`` from the cache.

    Args:
        model: rebuilds and rewrites the hidden-state cache of shards whose cache is missing or invalid
            (a fresh clone has none); must be the model the labels were made with.
        hidden: False skips the hidden states (targets and tokens only: no cache, no model needed).
        pad_token_id: pad id for the rebuild pass (any id: padded positions are masked).

    Raises:
        CorruptShardError: a shard is missing or its bytes differ from the manifest's checksum.
        MissingHiddenError: a cache is missing or invalid and no ``model`` was given.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest["complete"]:
        warnings.warn(f"label folder {directory} is incomplete ({len(manifest['shards'])} of "
                      f"{manifest['batches']} shards); rerun make_labels to finish it", stacklevel=2)
    shards, states = [], []
    settings = manifest["settings"]
    for entry in tqdm(manifest["shards"], desc=f"labels {directory.name}", unit="shard",
                      disable=not progress or not hidden):
        shard = load_shard(directory / entry["file"], entry["sha256"])
        shards.append({k: v for k, v in shard.items() if not k.startswith(WINDOWS)})
        if not hidden:
            continue
        cached, why = read_hidden(directory, entry)
        if cached is None:
            if model is None:
                raise MissingHiddenError(f"the hidden-state cache of {directory / entry['file']} cannot be used: "
                                         f"{why}; pass `model=` to load_labels (train-head does) to rebuild it")
            check_labels_match(manifest, model)
            rebuilt = rebuild_hidden(model, shard, entry["windows"][0], settings["max_new_tokens"], pad_token_id)
            cached = rebuilt.to(HIDDEN_DTYPES[settings["hidden_dtype"]])
            write_hidden(directory, entry["batch"], cached, entry["sha256"])
        states.append(cached)
    if not shards:
        return {}
    rows = {key: torch.cat([s[key] for s in shards]) for key in sorted(shards[0])}
    if hidden:
        rows["hidden"] = torch.cat(states)
    return rows
