"""Per-batch results of a long pass, kept on disk so that an interrupted fit resumes mid-pass.

An entropy-matched fit with the lookahead's F spends most of its time in two passes over the fit
prompts, batch by batch: the lookahead's teacher-forced pass (once per fit) and each round's
generations. At 48 prompts x 512 tokens on two CPU cores each is an hour or more, longer than a
session may last. A :class:`BatchStore` keeps every finished batch's tensors in one safetensors file,
rewritten atomically after each batch, so a rerun picks up at the first batch not yet done.

The file is tied to an identity (the fit's model, windows and settings, and for a round its schedule)
and checksummed: a file whose bytes do not match their checksum is refused with an error that names
it, never used; a file of another identity is stale (another round, another fit) and starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .files import write_atomic

FORMAT = "calibrated-sampling batch store"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors``, in name order."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class BatchStore:
    """Tensors per batch index, in ``path``, for one ``identity`` (a JSON-able dict).

    ``get(i)`` gives batch i's tensors or None; ``put(i, tensors)`` records them and rewrites the file.
    A file of another identity is not used: with ``other="replace"`` (a round's store, whose schedule
    has moved on) the first ``put`` overwrites it; with ``other="refuse"`` (a pass another fit may still
    resume) it raises ValueError naming the file. A damaged file raises ValueError naming it, so hours
    of results are neither trusted wrongly nor overwritten unseen."""

    def __init__(self, path: str | os.PathLike, identity: dict, other: str = "replace"):
        if other not in ("replace", "refuse"):
            raise ValueError(f"`other` must be 'replace' or 'refuse', but is {other!r}")
        self.path = Path(path)
        self.identity = identity_digest(identity)
        self.other = other
        self.batches: dict[int, dict[str, torch.Tensor]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        try:
            size = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
            tensors = load_safetensors(data)
        except Exception as error:  # truncated or overwritten: any parse error
            raise ValueError(f"batch store {self.path} is damaged ({type(error).__name__}: {error}); delete it "
                             "to redo its batches") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a calibrated-sampling batch store; delete it or choose another "
                             "`--out`")
        if _digest(tensors) != metadata.get("sha256"):
            raise ValueError(f"batch store {self.path} is corrupt (checksum mismatch); delete it to redo its batches")
        if metadata.get("identity") != self.identity:
            if self.other == "refuse":
                raise ValueError(f"batch store {self.path} belongs to another run (other model, windows or "
                                 "settings); delete it or choose another `--out`")
            return  # stale (another round): replaced on the first put
        for name, tensor in tensors.items():
            index, _, key = name.partition("/")
            self.batches.setdefault(int(index), {})[key] = tensor

    @property
    def seconds(self) -> float:
        """The time the batches kept so far took, where they recorded it (a tensor ``seconds``): a resumed
        run adds it to its own, so its report counts the whole pass."""
        return sum(float(batch["seconds"]) for batch in self.batches.values() if "seconds" in batch)

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, index: int) -> dict[str, torch.Tensor] | None:
        return self.batches.get(index)

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.batches[index] = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
        flat = {f"{i}/{key}": tensor for i, batch in self.batches.items() for key, tensor in batch.items()}
        metadata = {"format": FORMAT, "identity": self.identity, "sha256": _digest(flat)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, save_safetensors(flat, metadata=metadata))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def kept_or_run(store: BatchStore | None, index: int, run: Callable[..., dict[str, torch.Tensor]], *args) -> dict:
    """Batch ``index`` from ``store``, or ``run(*args)``'s tensors with its time as ``seconds``, added to the store."""
    done = None if store is None else store.get(index)
    if done is None:
        started = time.perf_counter()
        done = {**run(*args), "seconds": torch.tensor(time.perf_counter() - started, dtype=torch.float64)}
        if store is not None:
            store.put(index, done)
    return done
