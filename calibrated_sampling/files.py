"""Writing files so that an interruption never leaves a half-written one under the final name.

Every file the library writes and later trusts (label shards and manifests, head weights and configs,
checkpoints, journals, results) is written to ``NAME.tmp`` beside it, flushed to disk, and then
renamed over ``NAME``: a rename within a folder is atomic, so a reader sees the old file or the new
one, never a mix. A crash leaves at most a ``.tmp`` file, which the next write replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a path (safetensors' ``save_file``, a
    folder built file by file); when the block ends without an error it replaces ``path`` (a folder
    replaces the old folder), and on an error it is removed.

    >>> with atomic_path("head/head.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, str(tmp))
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)  # a leftover of an interrupted write
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # os.replace cannot replace a non-empty folder
    else:
        _fsync(tmp)  # the bytes are on disk before the name points at them
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary file; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def read_json(path: Path, what: str):
    """The JSON in ``path``, with errors that name the file: FileNotFoundError when it is missing,
    ValueError when it does not parse (``what`` says what the file should have been)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
