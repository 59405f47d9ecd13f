"""Reading JSONL input files with errors that name the file and line.

Every reader of user-supplied JSONL (evaluation sets, labelled topic data, pages to label,
seed pages for QA synthesis) goes through ``read_jsonl``: blank lines are skipped, a line
that is not JSON or not a JSON object raises the caller's error class with ``path:line``,
and ``.gz`` files are read transparently.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


def read_jsonl(path: str | os.PathLike, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every non-blank line of ``path`` (1-based numbers).

    Raises ``error("path:line: ...")`` for a line that is not valid JSON or not an object."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
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
