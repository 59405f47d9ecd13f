"""The files of a synthesis run and how they survive a crash (see megasyne.syne.synth.pipeline).

Next to ``out.jsonl``:

    out.jsonl                   kept pairs (JSONL, the records preprocess_data reads)
    out.jsonl.state.jsonl       one ``{"key", "outcome"}`` line per judged item
    out.jsonl.responses.jsonl   every answer the backend returned (``key, text, truncated,
                                attempts, seconds``), appended as it arrives, before judging
    out.jsonl.failures.jsonl    requests that failed after their retries (``key, error,
                                attempts, time``); those items are requested again next run
    out.jsonl.run.json          the settings (a resume must match them), written atomically

What a SIGKILL at any moment leaves, and what the next run does with it:
- an answer is appended (and flushed to the kernel) the moment it arrives, so an item whose
  answer came back is never requested again: the next run judges it from this journal;
- judging runs in item order; a kept record is appended to ``out.jsonl`` before its item's
  state line, and state lines are written in groups (``commit``: fsync the output, then append
  the state lines and fsync them), at most every ``sync_seconds`` and at the end;
- a restart cuts a torn last line off every file, drops kept records whose state line never
  landed, and judges those items again, from the journal, in the same order: the same result.
A power loss can lose what was not fsynced yet (the journal is fsynced at commits too); the
rules above still hold for what is on disk.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megasyne.atomic import atomic_write_text
from megasyne.errors import RecipeToolError
from megasyne.jsonl import cut_torn_tail, read_jsonl


class StoreError(RecipeToolError, ValueError):
    """A synthesis state file that cannot be read back (a corrupt line other than a torn last one)."""


def read_lines(path: Path) -> list[dict]:
    """JSON lines of ``path``; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    cut_torn_tail(path)
    return [rec for _, rec in read_jsonl(path, StoreError)]



def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


class RunFiles:
    """Open files of one run: load what earlier runs left, append, commit."""

    SUFFIXES = (".state.jsonl", ".responses.jsonl", ".failures.jsonl", ".run.json",
                ".report.json")

    def __init__(self, output: str | os.PathLike, *, rejects: str | None = None,
                 sync_seconds: float = 0.5) -> None:
        self.out = Path(output)
        self.state = self.sibling(".state.jsonl")
        self.responses = self.sibling(".responses.jsonl")
        self.failures = self.sibling(".failures.jsonl")
        self.rejects = Path(rejects) if rejects else None
        self.sync_seconds = sync_seconds
        self._pending_state: list[str] = []
        self._last_sync = time.monotonic()
        self._files: dict[str, object] = {}

    def sibling(self, suffix: str) -> Path:
        return self.out.with_name(self.out.name + suffix)

    def remove_all(self) -> None:
        """--restart: forget every earlier run."""
        self.out.unlink(missing_ok=True)
        for suffix in self.SUFFIXES:
            self.sibling(suffix).unlink(missing_ok=True)

    def load(self) -> tuple[dict[str, str], list[dict], dict[str, dict]]:
        """(outcome per judged key, kept records, journalled answers of unjudged keys).

        Kept records without a state line are dropped from the output file (rewritten
        atomically): their items are judged again."""
        done = {r["key"]: r["outcome"] for r in read_lines(self.state)}
        records = read_lines(self.out)
        kept = [r for r in records if done.get(r.get("key")) == "kept"]
        if len(kept) != len(records):
            atomic_write_text(self.out, "".join(map(_line, kept)))
        answers = {r["key"]: r for r in read_lines(self.responses) if r["key"] not in done}
        return done, kept, answers

    def open(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for name, path in (("out", self.out), ("state", self.state),
                           ("responses", self.responses), ("failures", self.failures),
                           ("rejects", self.rejects)):
            if path is not None:
                self._files[name] = open(path, "a", encoding="utf-8")

    def _append(self, name: str, record: dict) -> None:
        f = self._files[name]
        f.write(_line(record))
        f.flush()  # in the kernel now: a SIGKILL of this process cannot lose it

    def answer(self, record: dict) -> None:
        self._append("responses", record)

    def failure(self, record: dict) -> None:
        self._append("failures", record)

    def judged(self, key: str, outcome: str, record: dict | None, reject: dict | None) -> None:
        if record is not None:
            self._append("out", record)
        if reject is not None and "rejects" in self._files:
            self._append("rejects", reject)
        self._pending_state.append(_line({"key": key, "outcome": outcome}))

    def commit(self, force: bool = False) -> None:
        """Make the judged items durable: output (and journal) fsynced, then their state lines."""
        if not self._pending_state or (
                not force and time.monotonic() - self._last_sync < self.sync_seconds):
            return
        for name in ("out", "responses"):
            os.fsync(self._files[name].fileno())
        f = self._files["state"]
        f.write("".join(self._pending_state))
        f.flush()
        os.fsync(f.fileno())
        self._pending_state.clear()
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._files:
            self.commit(force=True)
        for f in self._files.values():
            f.close()
        self._files.clear()


__all__ = ["RunFiles", "read_lines"]
