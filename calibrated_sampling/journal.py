"""A journal of finished measurements, so that a long comparison resumes where it stopped.

``compare --full`` is some fifty ``measure`` calls, hours on a CPU; a machine that goes away loses
only the measurement in flight. Each finished result is appended to ``DIR/measurements.jsonl`` as one
line and flushed to disk before the next one starts. The first line holds a fingerprint of everything
the numbers depend on (model weights, tokenizer, prompts, seed, preset, device): a journal of
another comparison is refused, never mixed in. A last line cut off by an interruption is dropped with a
warning (that measurement runs again); a damaged line elsewhere is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

JOURNAL_NAME = "measurements.jsonl"


def fingerprint(parts: dict) -> str:
    """A short, stable hash of a JSON-able description of a run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """Results by key, read from and appended to one JSON-lines file (module docstring)."""

    def __init__(self, path: str | Path, run_fingerprint: str):
        self.path = Path(path)
        self.entries: dict[str, object] = {}
        header = {"fingerprint": run_fingerprint}
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([json.dumps(header)])
            return
        lines = self.path.read_text().splitlines()
        try:
            found = json.loads(lines[0]).get("fingerprint") if lines else None
        except json.JSONDecodeError:
            found = None
        if found != run_fingerprint:
            raise ValueError(f"{self.path} holds the measurements of another comparison (fingerprint {found!r}, "
                             f"this one is {run_fingerprint!r}: other model, prompts, seed, preset or device); "
                             "write to another `out` folder, or delete that file to measure again")
        kept = lines[:1]
        for number, line in enumerate(lines[1:], 2):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{self.path} line {number} is damaged; delete the file to measure again") from None
                warnings.warn(f"{self.path}: its last line was cut off by an interruption; that measurement "
                              "runs again", stacklevel=2)
                self._rewrite(kept)
                break
            self.entries[entry["key"]] = entry["value"]
            kept.append(line)

    def get(self, key: str):
        """The recorded value of ``key``, or None."""
        return self.entries.get(key)

    def add(self, key: str, value) -> None:
        """Record ``value`` (JSON-able; inf and NaN allowed) and make sure it is on disk."""
        self.entries[key] = value
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"key": key, "value": value}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)
