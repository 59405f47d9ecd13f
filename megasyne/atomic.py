"""Atomic file writes: a temp file beside the target, flushed and fsynced, then ``os.replace``.

A reader (or a crash) sees the old file or the new one, never a half-written one; the temp
file is removed when writing fails. Used for every index, sidecar, manifest, state and
report file megasyne writes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` with ``write(binary_file)`` atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")
