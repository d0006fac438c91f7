"""A journal of finished measurements, so that a long comparison resumes where it stopped.

``compare --full`` is some fifty ``measure`` calls, hours on a CPU; a machine that goes away loses
only the measurement in flight. Each finished result is appended to ``DIR/measurements.jsonl`` as one
line and flushed to disk before the next one starts. The first line holds a fingerprint of everything
the numbers depend on (model weights, tokenizer, prompts, seed, preset, device): a journal of
another comparison is refused, never mixed in. A line that holds no entry (the last one cut off by an
interruption, or one damaged by hand) is moved to ``measurements.jsonl.damaged`` with a warning that
names it: the good entries are kept, the damaged ones measured again, and nothing is lost. The
measurement in flight keeps its finished batches beside the journal (:meth:`Journal.batches`), so an
hours-long one is not lost either.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from .batch_store import BatchStore, identity_digest
from .files import write_atomic

JOURNAL_NAME = "measurements.jsonl"


def fingerprint(parts: dict) -> str:
    """A short, stable hash of a JSON-able description of a run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """Results by key, read from and appended to one JSON-lines file (module docstring)."""

    def __init__(self, path: str | Path, run_fingerprint: str):
        self.path = Path(path)
        self.fingerprint = run_fingerprint
        self.entries: dict[str, object] = {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        if not lines:  # a new journal (an empty file holds nothing to keep)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([json.dumps({"fingerprint": run_fingerprint})])
            return
        self._check_header(lines[0], run_fingerprint)
        damaged = []
        for number, line in enumerate(lines[1:], 2):
            entry = _entry(line)
            if entry is not None:
                self.entries[entry["key"]] = entry["value"]
            elif line.strip():
                damaged.append(number)
        if damaged:
            self._set_aside(lines, damaged)

    def _check_header(self, line: str, run_fingerprint: str) -> None:
        try:
            header = json.loads(line)
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or "fingerprint" not in header:
            raise ValueError(f"{self.path} line 1 is not a journal header ({line[:60]!r}): the file is not a "
                             "journal of measurements; write to another `out` folder, or move that file away")
        if header["fingerprint"] != run_fingerprint:
            raise ValueError(f"{self.path} holds the measurements of another comparison (fingerprint "
                             f"{header['fingerprint']!r}, this one is {run_fingerprint!r}: other model, prompts, "
                             "seed, preset or device); write to another `out` folder, or delete that file to "
                             "measure again")

    def _set_aside(self, lines: list[str], damaged: list[int]) -> None:
        """Move the damaged lines (1-based ``damaged``) to ``NAME.damaged`` and keep the good ones: nothing is
        lost, and the measurements of the damaged lines run again."""
        aside = self.path.with_name(self.path.name + ".damaged")
        with open(aside, "a") as handle:  # first the copy, then the rewrite: a crash between loses nothing
            handle.writelines(lines[number - 1] + "\n" for number in damaged)  # as they were: to paste back
            handle.flush()
            os.fsync(handle.fileno())
        self._rewrite([line for number, line in enumerate(lines, 1) if number not in damaged])
        if damaged == [len(lines)] and not lines[-1].rstrip().endswith("}"):
            what = "its last line was cut off by an interruption"
        else:
            what = f"line {', '.join(map(str, damaged))} {'is' if len(damaged) == 1 else 'are'} damaged (not a journal entry)"
        warnings.warn(f"{self.path}: {what}; moved to {aside}, the {len(self.entries)} good entries are kept and "
                      "the damaged measurements run again", stacklevel=3)

    def get(self, key: str):
        """The recorded value of ``key``, or None."""
        return self.entries.get(key)

    def add(self, key: str, value) -> None:
        """Record ``value`` (JSON-able; inf and NaN allowed) and make sure it is on disk; its batches
        (:meth:`batches`) are then deleted."""
        self.entries[key] = value
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"key": key, "value": value}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._batches_path(key).unlink(missing_ok=True)

    def batches(self, key: str) -> BatchStore:
        """Where the measurement of ``key`` keeps its finished batches until :meth:`add` records it
        (``DIR/batches.cache/``, tied to this journal's fingerprint and the key): one sampler of the
        lookahead at 128 prompts x 512 tokens is hours on a CPU, and an interruption then costs a batch."""
        return BatchStore(self._batches_path(key), {"run": self.fingerprint, "key": key})

    def _batches_path(self, key: str) -> Path:
        digest = identity_digest({"run": self.fingerprint, "key": key})
        return self.path.parent / "batches.cache" / f"{digest[:24]}.safetensors"

    def _rewrite(self, lines: list[str]) -> None:
        write_atomic(self.path, "".join(line + "\n" for line in lines))


def _entry(line: str) -> dict | None:
    """The entry a journal line holds ({"key": str, "value": ...}), or None for a damaged line."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "value" not in entry:
        return None
    return entry
