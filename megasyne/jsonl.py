"""Reading JSONL input files with errors that name the file and line.

Every reader of user-supplied JSONL (evaluation sets, labelled topic data, pages to label,
seed pages for QA synthesis) goes through ``read_jsonl``: blank lines are skipped, a line
that is not JSON or not a JSON object raises the caller's error class with ``path:line``,
and ``.gz`` files are read transparently. The append-only JSONL files megasyne writes itself
(metrics, synthesis journals) may end in a torn line after a kill: ``cut_torn_tail``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator


def read_jsonl(path: str | os.PathLike, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every non-blank line of ``path`` (1-based numbers).

    Raises ``error("path:line: ...")`` for a line that is not valid JSON or not an object, and
    ``error("path: ...")`` for a file that cannot be opened or is not UTF-8 text."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        f = opener(path, "rb")  # bytes, decoded line by line: a bad byte names its line
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    n = 0
    with f:
        try:
            for n, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise error(f"{path}:{n}: not UTF-8 ({exc.reason} at byte {exc.start})") \
                        from None
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise error(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") \
                        from None
                if not isinstance(rec, dict):
                    raise error(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                yield n, rec
        except (OSError, EOFError) as exc:  # a damaged .gz, a read error
            raise error(f"{path}: cannot read it after line {n} ({exc})") from None


def cut_torn_tail(path: str | os.PathLike) -> tuple[int, str] | None:
    """For an append-only JSONL file this program writes itself (each line in one write,
    newline last): a last line without its newline is what a kill mid-write leaves. Cut it off
    the file and return ``(its line number, its text)``; None when the file ends cleanly."""
    with open(path, "r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return None
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    return data.count(b"\n") + 1, data[keep:].decode("utf-8", errors="replace")
