"""Tokenise JSON-lines / Parquet corpora into Megatron ``.bin``/``.idx`` datasets (+ metadata sidecar).

One dataset per JSON key, named as Megatron's ``tools/preprocess_data.py`` does:
``<output_prefix>_<key>_document`` (``--split-sentences`` is not supported: one sequence per document).

Pipeline (memory bounded, independent of corpus size)::

    main process: cut the input into tasks of <= batch_size lines, in input order
        (megasyne.data.corpus_reader.batches), doing no per-line work:
        - a plain .jsonl file: byte ranges of whole lines (newlines found with numpy); the
          worker reads, splits and parses its range itself, so no text crosses a pipe
        - a compressed file (.gz, .zst, .bz2, .xz): decompressed here (a stream is read from its
          start) and sent as blocks of whole lines, which the worker splits and parses
        - Parquet: rows read here, sent as dicts
        -> workers (processes, each with its own tokenizer; megasyne.data.preprocess_pool):
           JSON parse + encode -> per key: flat token array + lengths [records] (0 = empty or bad)
        -> main, strictly in submission order: bad-record policy, then writer.add_documents
    In flight: at most 16 MiB of input per worker (a Parquet task counts as 4 MiB), so memory
    stays bounded (``Pool.imap``, Megatron's choice, has no bound: its feeder thread reads the
    whole input ahead of slow workers) while a worker that the OS deschedules for a while does
    not stall the others: results are taken in order, and with a handful of small tasks in
    flight the other workers would run dry waiting for the late one.

Outputs are complete or absent. Everything is written under a staging directory beside the
outputs; only when every dataset of the run is complete (``.bin``, ``.idx``, sidecar, report) are
they published by renames, each dataset's ``.idx`` last: ``<prefix>.idx`` is the commit marker, a
present ``.idx`` means the whole dataset is there. Leftovers of a killed run on the same output
prefix are removed by the next run on it. See megasyne.data.staging.

Failure policy: a line that is not JSON, not an object, lacks a key, or has a non-string text /
non-scalar metadata value is *bad*. By default the first bad line aborts the run with
``<file>:<line>: <why>`` and nothing is published. With ``skip_bad_lines`` bad lines are dropped
from every key's dataset, counted and listed (first 20) in the report. A truncated or corrupt
compressed file is not a bad line: it fails the run naming the file, with or without
``skip_bad_lines``. Documents with no tokens are counted as ``empty`` and never written (per key).
Blank lines are ignored. A tokenizer worker that dies (e.g. SIGKILL from the out-of-memory killer)
fails the run at once, naming the process and the signal; a full disk fails it with "no space left
on device" and the directory. In every failure nothing is published and the run's temporary files
are removed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import gc
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

try:  # optional: a faster JSON parser (requirements-ci.txt pins it); json is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the install
    _orjson = None

from megasyne.atomic import atomic_write_json
from megasyne.data import staging
from megasyne.data.corpus_reader import (
    LineBlock,
    LineRange,
    PreprocessError,
    RowBatch,
    batches,
    expand_inputs,
    is_parquet,
    read_line_range,
    split_lines,
)
from megasyne.data.indexed_dataset import (
    IndexedDatasetWriter,
    best_token_dtype,
    idx_fingerprint,
)
from megasyne.data.metadata import FIELD_NAME_RE as _FIELD_NAME
from megasyne.data.metadata import write_metadata_field
from megasyne.data.preprocess_pool import (
    WorkerDied,
    WorkerFailed,
    WorkerPool,
    describe_exit,
)
from megasyne.data.tokenizers import ENGINES, load_tokenizer
from megasyne.errors import DataError

_MAX_BAD_EXAMPLES = 20
_INFLIGHT_BYTES = 16 << 20  # input bytes in flight per worker
_PARQUET_TASK_BYTES = 4 << 20
_META_CHUNK = 1 << 16
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

__all__ = ["PreprocessConfig", "PreprocessError", "dataset_prefix", "expand_inputs",
           "run_preprocess"]


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[str]  # files, globs or directories, in order
    output_prefix: str
    tokenizer: str  # path or spec, see megasyne.data.tokenizers.load_tokenizer
    tokenizer_kind: str | None = None  # force/validate: hf | sentencepiece | tiktoken
    # tokenizer.json only: auto (tiktoken where the ids are the same) | tokenizers | tiktoken
    tokenizer_engine: str = "auto"
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    metadata_keys: list[str] = field(default_factory=list)
    append_eod: bool = False
    prepend_bos: bool = False
    workers: int = 1
    skip_bad_lines: bool = False
    log_interval: int = 10000  # documents between log lines on stderr; 0: none
    batch_size: int = 256  # lines per worker task (a task also ends at 4 MiB; Parquet: rows)
    progress: bool | None = None  # tqdm bar; None: only when stderr is a terminal

    def __post_init__(self) -> None:
        if not self.inputs:
            raise PreprocessError("no --input given")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise PreprocessError(f"--json-keys must be distinct and non-empty: {self.json_keys}")
        if set(self.metadata_keys) & set(self.json_keys):
            raise PreprocessError("a key cannot be both a --json-keys text and a --metadata-keys field")
        for m in self.metadata_keys:
            if not _FIELD_NAME.match(m):
                raise PreprocessError(f"--metadata-keys {m!r}: must match {_FIELD_NAME.pattern}")
        if self.workers < 1 or self.batch_size < 1:
            raise PreprocessError("--workers and --batch-size must be >= 1")
        if self.tokenizer_engine not in ENGINES:
            raise PreprocessError(f"--tokenizer-engine {self.tokenizer_engine!r}: one of {ENGINES}")


def dataset_prefix(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


# ---------------------------------------------------------------------------------------------
# Worker side: parse + encode one batch
_W: dict = {}
_FDS: dict = {}  # path -> descriptor, kept open across a worker's tasks


class _Bad(DataError):
    """One bad input record; caught per record, then skipped or raised as a PreprocessError
    naming the file and line."""


def _init_worker(spec: dict) -> None:
    # A forked worker inherits the tokenizer the main process loaded (_results puts it in _W
    # before forking): loading again costs ~0.5 s per worker for Llama-3's 128k-token files,
    # a third of a 66k-document run. A spawned worker starts empty and loads its own.
    tok = _W.get("tok")
    if tok is None or any(_W.get(k) != spec[k] for k in ("path", "kind", "engine")):
        tok = load_tokenizer(spec["path"], kind=spec["kind"], eod=spec["eod_id"],
                             bos=spec["bos_id"], engine=spec["engine"])
    _W.update(spec, tok=tok)


def _scalar(rec: dict, key: str):
    if key not in rec:
        raise _Bad(f"missing metadata key {key!r}")
    v = rec[key]
    if isinstance(v, float) and math.isnan(v):
        raise _Bad(f"metadata key {key!r} is NaN")
    if v is None or not isinstance(v, (int, float, str)):  # bool is an int
        raise _Bad(f"metadata key {key!r} is {type(v).__name__}, not a number or string")
    return v


_EXACT_TYPES = (str, int, bool)  # values orjson and json decode identically


def _loads(payload: bytes, needed: tuple):
    """``json.loads(payload)``, through orjson when it is installed (~3x faster per line here).

    orjson's result is used only when it is an object whose ``needed`` keys all hold strings,
    integers or booleans, which both libraries decode to the same values. Anything else is
    parsed again by json.loads, whose value, verdict and message stand: what orjson refuses
    (invalid UTF-8, NaN, lone surrogates, a BOM), and floats, since orjson turns an integer
    beyond 64 bits into a float where json keeps the int. So bad lines and their reasons, and
    every metadata value, are json's, as in Megatron's loop.
    """
    if _orjson is not None:
        try:
            rec = _orjson.loads(payload)
        except _orjson.JSONDecodeError:
            rec = None
        if type(rec) is dict and all(type(rec.get(k)) in _EXACT_TYPES for k in needed):
            return rec
    return json.loads(payload)


def _parse(payload, keys, meta_keys):
    """-> (texts per key, metadata values), or raise _Bad with the reason."""
    try:
        rec = _loads(payload, (*keys, *meta_keys)) if isinstance(payload, bytes) else payload
    except UnicodeDecodeError as exc:
        raise _Bad(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _Bad(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise _Bad(f"a JSON {type(rec).__name__}, not an object")
    texts = []
    for k in keys:
        if k not in rec:
            raise _Bad(f"missing key {k!r} (has: {sorted(rec)[:10]})")
        if not isinstance(rec[k], str):
            raise _Bad(f"key {k!r} is {type(rec[k]).__name__}, not a string")
        texts.append(rec[k])
    return texts, tuple(_scalar(rec, k) for k in meta_keys)


def _records(task) -> tuple[list, list, object, int]:
    """A task's records: (payloads, their line numbers, r -> payload to re-parse for an error
    message, blank lines).

    A :class:`LineRange` is read here, in the worker, and a :class:`LineBlock` split into
    lines here; their lines come without their newline,
    which JSON ignores. A line re-parsed for its error message gets it back, so that the message
    is the one the whole line gets (json.loads reports an unterminated string differently when
    a newline follows).
    """
    if isinstance(task, LineRange):
        lines, ends_with_newline = read_line_range(task.path, task.start, task.end, _FDS)
    elif isinstance(task, LineBlock):
        lines, ends_with_newline = split_lines(task.data)
    else:  # Parquet rows
        return task.rows, task.nums, task.rows.__getitem__, 0
    first, last = task.first, task.first + len(lines) - 1
    nums = [first + i for i, line in enumerate(lines) if line and not line.isspace()]
    payloads = [lines[n - first] for n in nums]

    def whole_line(r: int) -> bytes:
        return payloads[r] if nums[r] == last and not ends_with_newline else payloads[r] + b"\n"

    return payloads, nums, whole_line, len(lines) - len(nums)


def _parse_records(payloads: list, whole_line) -> tuple[list, list, list, list]:
    """-> (rows parsed, texts [keys][rows], metadata per record or None, bad [(record, why)]).

    Fast path, the usual case (one JSON key, no metadata keys, orjson installed): a line whose
    orjson value holds a string under the key is taken as it is, ~4x cheaper per line than the
    general path, which is what every other line goes through (with json's verdict and message
    for a bad one: see :func:`_loads`).
    """
    keys, meta_keys = _W["json_keys"], _W["metadata_keys"]
    rows, texts, bad = [], [[] for _ in keys], []
    meta = [None] * len(payloads)
    fast = _orjson is not None and len(keys) == 1 and not meta_keys
    loads, key, out0 = (_orjson.loads if fast else None), keys[0], texts[0]
    for r, payload in enumerate(payloads):
        if fast and isinstance(payload, bytes):
            try:
                text = loads(payload)[key]
            except (_orjson.JSONDecodeError, KeyError, TypeError, IndexError):
                text = None
            if type(text) is str:
                rows.append(r)
                out0.append(text)
                continue
        try:
            got, meta[r] = _parse(whole_line(r), keys, meta_keys)
        except _Bad as exc:
            bad.append((r, str(exc)))
            continue
        rows.append(r)
        for ki, t in enumerate(got):
            texts[ki].append(t)
    return rows, texts, meta, bad


class _Encoded(NamedTuple):
    """A worker's result for one task (see corpus_reader.batches)."""

    bad: list  # [(record, why)]
    lengths: np.ndarray  # int64 [keys, records]; 0 = empty or bad
    flats: list  # [keys] of token arrays, the records' documents back to back
    meta: list  # [records] metadata tuple, or None
    nums: list  # [records] line (Parquet: row) numbers
    blank: int  # blank lines skipped


def _encode_task(task) -> _Encoded:
    """Read, parse and encode one task."""
    payloads, nums, whole_line, blank = _records(task)
    tok, keys = _W["tok"], _W["json_keys"]
    rows, texts, meta, bad = _parse_records(payloads, whole_line)
    try:  # one batched call per key (HF: encode_batch_fast, no offsets): ~20% faster than 1 by 1
        per_key = [tok.encode_batch(t) for t in texts]
    except Exception:  # find the record(s) the tokenizer refuses, e.g. lone surrogates
        per_key = [[] for _ in keys]
        kept = []
        for i, r in enumerate(rows):
            try:
                docs = [tok.encode(texts[ki][i]) for ki in range(len(keys))]
            except Exception as exc:
                bad.append((r, f"tokenizer failed: {type(exc).__name__}: {exc}"))
                meta[r] = None
                continue
            kept.append(r)
            for ki, doc in enumerate(docs):
                per_key[ki].append(doc)
        rows = kept
    head = [_W["bos_id"]] if _W["prepend_bos"] else []
    tail = [_W["eod_id"]] if _W["append_eod"] else []
    extra = len(head) + len(tail)
    lengths = np.zeros((len(keys), len(payloads)), dtype=np.int64)
    flats = []
    for ki, docs in enumerate(per_key):
        flat, lens = [], [0] * len(payloads)
        for r, doc in zip(rows, docs):
            if doc:  # empty stays length 0: counted, never written (no lone BOS/EOD documents)
                flat += head
                flat += doc
                flat += tail
                lens[r] = len(doc) + extra
        lengths[ki] = lens
        flats.append(np.array(flat, dtype=_W["dtype"]))
    return _Encoded(bad, lengths, flats, meta, nums, blank)


def _drop_record(result: _Encoded, r: int) -> None:
    """Remove record r's tokens from every key of a batch result (rare: metadata type clash)."""
    lengths, flats, meta = result.lengths, result.flats, result.meta
    for ki in range(lengths.shape[0]):
        start = int(lengths[ki, :r].sum())
        flats[ki] = np.delete(flats[ki], np.s_[start:start + int(lengths[ki, r])])
        lengths[ki, r] = 0
    meta[r] = None


# ---------------------------------------------------------------------------------------------
# Metadata columns, spilled to disk in chunks
class _MetaColumn:
    """Values of one metadata key for one dataset, in written-document order, spilled every 64 Ki."""

    def __init__(self, name: str, spill_dir: str) -> None:
        self.name, self.spill_dir = name, spill_dir
        self.kind: str | None = None  # "num" | "str", fixed by the first value
        self.has_float = False
        self.categories: dict[str, int] = {}
        self.buf: list = []
        self.chunks: list[tuple[str, int]] = []  # (path, length)
        self.count = 0

    def kind_of(self, v) -> str:
        return "str" if isinstance(v, str) else "num"

    def append(self, v) -> None:
        if self.kind == "str":
            v = self.categories.setdefault(v, len(self.categories))
        elif isinstance(v, float):
            self.has_float = True
        self.buf.append(v)
        self.count += 1
        if len(self.buf) >= _META_CHUNK:
            self._spill()

    def _spill(self) -> None:
        if not self.buf:
            return
        arr = np.array(self.buf, dtype=np.float64 if any(isinstance(v, float) for v in self.buf)
                       else np.int64)
        path = os.path.join(self.spill_dir, f"{self.name}.{len(self.chunks)}.npy")
        np.save(path, arr)
        self.chunks.append((path, arr.size))
        self.buf = []

    def finish(self):
        """(values [count] as a memmap, categories or None), with the narrowest fitting dtype."""
        self._spill()
        if self.kind == "str":
            k = len(self.categories)
            dtype = np.int8 if k <= 127 else np.int16 if k <= 32767 else np.int32
        elif self.has_float:
            dtype = np.float64
        else:
            lo = min((int(np.load(p).min()) for p, n in self.chunks if n), default=0)
            hi = max((int(np.load(p).max()) for p, n in self.chunks if n), default=0)
            dtype = next(t for t in (np.int8, np.int16, np.int32, np.int64)
                         if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
        out_path = os.path.join(self.spill_dir, f"{self.name}.all.npy")
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=(self.count,))
        pos = 0
        for p, n in self.chunks:
            out[pos:pos + n] = np.load(p)
            pos += n
            os.unlink(p)
        out.flush()
        cats = list(self.categories) if self.kind == "str" else None
        return out, cats


# ---------------------------------------------------------------------------------------------
# Tokenising: batches through the workers, in input order
def _results(cfg: PreprocessConfig, spec: dict, tok, todo, files: list[str]):
    """(file index, encoded task) in input order (for what is in flight: see the module's
    docstring)."""
    _W.update(spec, tok=tok)  # forked workers inherit it (see _init_worker)
    try:
        if cfg.workers == 1:
            for fi, task in todo:
                yield fi, _encode_task(task)
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        # Forked workers share the parent's heap (torch, megatron, ... when imported)
        # copy-on-write; the first full gc in any process writes every object's gc header and so
        # copies the whole heap, once per process (measured: +100 MB each, mid-run). Frozen
        # objects are never scanned.
        gc.collect()
        gc.freeze()
        try:
            with WorkerPool(cfg.workers, _init_worker, _encode_task, spec,
                            start_method=method) as pool:
                inflight: deque = deque()  # (task number, file index, task)
                sizes: deque = deque()  # input bytes of each task in flight
                budget, held = _INFLIGHT_BYTES * cfg.workers, 0
                for n, (fi, task) in enumerate(todo):
                    pool.submit(n, task)
                    inflight.append((n, fi, task))
                    sizes.append(_task_bytes(task))
                    held += sizes[-1]
                    while held >= budget:
                        held -= sizes.popleft()
                        yield _collect(cfg, pool, inflight, files)
                while inflight:
                    yield _collect(cfg, pool, inflight, files)
        finally:
            gc.unfreeze()
    finally:
        _W.clear()
        _close_fds()


def _task_bytes(task) -> int:
    """Input bytes a task holds (a Parquet row's size is not known: counted as 4 MiB)."""
    if isinstance(task, LineRange):
        return task.end - task.start
    if isinstance(task, LineBlock):
        return len(task.data)
    return _PARQUET_TASK_BYTES


def _close_fds() -> None:
    for fd in _FDS.values():
        os.close(fd)
    _FDS.clear()


def _collect(cfg: PreprocessConfig, pool: WorkerPool, inflight: deque, files: list[str]):
    n, fi, _ = inflight[0]
    try:
        result = pool.result(n)
    except WorkerDied as exc:
        raise PreprocessError(_worker_died_message(cfg, exc, inflight, files)) from None
    except WorkerFailed as exc:
        raise PreprocessError(f"{files[fi]}: tokenizer {exc}") from None
    inflight.popleft()
    return fi, result


def _worker_died_message(cfg: PreprocessConfig, exc: WorkerDied, inflight, files) -> str:
    lost = [(fi, task) for n, fi, task in inflight if n in exc.lost]
    where = ""
    if lost:
        fi, task = lost[0]
        where = f" while tokenising {_loc(files[fi], task.first, isinstance(task, RowBatch))} onwards"
    if exc.exitcode == -signal.SIGKILL:
        hint = ("SIGKILL is what the kernel's out-of-memory killer sends (see dmesg or the job's "
                f"memory limit): rerun with fewer --workers (this run: {cfg.workers}) or a smaller "
                f"--batch-size (this run: {cfg.batch_size}), or give the job more memory")
    else:
        hint = "rerun; if it happens again, rerun with --workers 1 to see the error in the main process"
    return (f"tokenizer worker process {exc.pid} {describe_exit(exc.exitcode)}{where}; {hint}. "
            "Nothing was published.")


def _loc(path: str, num: int, parquet: bool) -> str:
    return f"{path}: row {num}" if parquet else f"{path}:{num}"


# ---------------------------------------------------------------------------------------------
# Writing: counts, the bad-record policy, the datasets and their metadata columns
@dataclass
class _Tally:
    keys: int
    files: int
    docs: list = field(init=False)
    tokens: list = field(init=False)
    empty: list = field(init=False)
    records: list = field(init=False)
    skipped: int = 0
    bad_examples: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"blank_lines": 0})

    def __post_init__(self) -> None:
        self.docs, self.tokens, self.empty = [0] * self.keys, [0] * self.keys, [0] * self.keys
        self.records = [0] * self.files


def _bad_rows(cfg: PreprocessConfig, result, columns) -> list[tuple[int, str]]:
    """The batch's bad records; a metadata value whose type (number vs string) differs from the
    first one seen is bad too, and is dropped from the result here."""
    bad, meta = result.bad, result.meta
    rows = list(bad)
    if not cfg.metadata_keys:
        return rows
    col0 = columns[0]
    for r, vals in enumerate(meta):
        if vals is None:
            continue
        for mi, v in enumerate(vals):
            c = col0[mi]
            if c.kind is None:
                for cols in columns:
                    cols[mi].kind = c.kind_of(v)
            elif c.kind_of(v) != c.kind:
                rows.append((r, f"metadata key {cfg.metadata_keys[mi]!r} is a {c.kind_of(v)}, "
                                f"earlier values were {c.kind}s"))
                _drop_record(result, r)
                break
    return rows


def _write_batch(cfg: PreprocessConfig, path: str, parquet: bool, result: _Encoded, writers,
                 columns, tally: _Tally) -> None:
    lengths, flats, meta, nums = result.lengths, result.flats, result.meta, result.nums
    tally.counts["blank_lines"] += result.blank
    bad_rows = _bad_rows(cfg, result, columns)
    for r, why in sorted(bad_rows):
        where = _loc(path, nums[r], parquet)
        if not cfg.skip_bad_lines:
            raise PreprocessError(f"{where}: {why} (use --skip-bad-lines to skip bad lines)")
        tally.skipped += 1
        if len(tally.bad_examples) < _MAX_BAD_EXAMPLES:
            tally.bad_examples.append(f"{where}: {why}")
            print(f"[preprocess] skipping {where}: {why}", file=sys.stderr)
    for ki in range(len(writers)):
        keep = lengths[ki] > 0
        writers[ki].add_documents(flats[ki], lengths[ki][keep])
        tally.docs[ki] += int(keep.sum())
        tally.tokens[ki] += int(flats[ki].size)
        tally.empty[ki] += len(nums) - len(bad_rows) - int(keep.sum())
        for r in np.flatnonzero(keep) if cfg.metadata_keys else ():
            for mi, v in enumerate(meta[r]):
                columns[ki][mi].append(v)


def _tokenise(cfg, spec, tok, files, writers, columns, tally: _Tally) -> None:
    """Read, encode and write every record of every file into the (staged) writers."""
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    t0, next_log = time.time(), cfg.log_interval
    parquet = [is_parquet(p) for p in files]
    with contextlib.ExitStack() as stack:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = stack.enter_context(tqdm(unit="doc", unit_scale=True, dynamic_ncols=True,
                                           desc="preprocess"))
        todo = batches(files, list(cfg.json_keys) + list(cfg.metadata_keys), cfg.batch_size)
        results = _results(cfg, spec, tok, todo, files)
        stack.callback(results.close)  # stops the workers on any error
        for fi, result in results:
            tally.records[fi] += len(result.nums)
            _write_batch(cfg, files[fi], parquet[fi], result, writers, columns, tally)
            if bar is not None:
                bar.update(len(result.nums))
                rate = tally.tokens[0] / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            if cfg.log_interval and tally.docs[0] >= next_log:
                dt = max(time.time() - t0, 1e-9)
                print(f"[preprocess] {tally.docs[0]:,} docs, {tally.tokens[0]:,} tokens, "
                      f"{tally.docs[0] / dt:,.0f} docs/s, {tally.tokens[0] / dt:,.0f} tokens/s",
                      file=sys.stderr)
                next_log = (tally.docs[0] // cfg.log_interval + 1) * cfg.log_interval


# ---------------------------------------------------------------------------------------------
def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole pipeline; returns {key: report dict}.

    Raises PreprocessError (bad input, a dead worker, a full disk, a busy output prefix); then
    nothing is published and the run's temporary files are gone.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked processes
    files = expand_inputs(cfg.inputs)
    tok = load_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_kind, engine=cfg.tokenizer_engine)
    if tok.engine_note:
        print(f"[preprocess] {tok.path}: encoded by the tokenizers library, not tiktoken: "
              f"{tok.engine_note}", file=sys.stderr)
    if cfg.append_eod and tok.eod_id is None:
        raise PreprocessError(f"{tok.path}: --append-eod, but the tokenizer has no end-of-document "
                              "token")
    if cfg.prepend_bos and tok.bos_id is None:
        raise PreprocessError(f"{tok.path}: --prepend-bos, but the tokenizer has no BOS token")
    prefixes = [dataset_prefix(cfg.output_prefix, k) for k in cfg.json_keys]
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        with staging.output_lock(cfg.output_prefix):
            for path in staging.remove_leftovers(cfg.output_prefix, prefixes):
                print(f"[preprocess] removed {path}: left by an interrupted run on this output "
                      "prefix", file=sys.stderr)
            stage = staging.make_stage(cfg.output_prefix)
            try:
                return _run_staged(cfg, files, tok, prefixes, stage)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except staging.StagingError as exc:
        raise PreprocessError(str(exc)) from None
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        raise PreprocessError(
            f"no space left on device while writing {', '.join(prefixes)} (in {out_dir}): free "
            "space on that filesystem, or choose an --output-prefix on a larger one, and rerun; "
            "nothing was published and this run's temporary files were removed") from exc


def _run_staged(cfg: PreprocessConfig, files: list[str], tok, prefixes: list[str],
                stage: str) -> dict:
    """Write every dataset completely inside ``stage``, then publish them all."""
    dtype = best_token_dtype(tok.vocab_size)
    # a spawned worker loads the tokenizer as the main process did: same file, kind and engine
    spec = dict(path=tok.path, kind=tok.kind, engine=cfg.tokenizer_engine, eod_id=tok.eod_id,
                bos_id=tok.bos_id, json_keys=list(cfg.json_keys),
                metadata_keys=list(cfg.metadata_keys), append_eod=cfg.append_eod,
                prepend_bos=cfg.prepend_bos, dtype=dtype)
    keys = cfg.json_keys
    staged = [staging.staged_prefix(stage, p) for p in prefixes]
    spill = os.path.join(stage, "spill")
    os.mkdir(spill)
    tally = _Tally(keys=len(keys), files=len(files))
    t0 = time.time()
    columns = [[_MetaColumn(f"{ki}.{m}", spill) for m in cfg.metadata_keys]
               for ki in range(len(keys))]
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(IndexedDatasetWriter(p, dtype)) for p in staged]
        _tokenise(cfg, spec, tok, files, writers, columns, tally)
        for w in writers:
            w.finalize()
    elapsed = time.time() - t0
    reports = {}
    for ki, key in enumerate(keys):
        fields = {}
        for mi, m in enumerate(cfg.metadata_keys):
            values, cats = columns[ki][mi].finish()
            write_metadata_field(staged[ki], m, values, description=f"JSON key {m!r} of the "
                                 "input, copied by preprocess_data.py", categories=cats,
                                 written_by="tools/preprocess_data.py")
            fields[m] = {"dtype": values.dtype.name, "categories": len(cats) if cats else None}
            del values
        reports[key] = _write_report(cfg, staged[ki], prefixes[ki], key, tok, dtype, files,
                                     tally.records, dict(
            docs=tally.docs[ki], tokens=tally.tokens[ki], skipped=tally.skipped,
            empty=tally.empty[ki], blank_lines=tally.counts["blank_lines"],
            bad_examples=tally.bad_examples, metadata=fields, elapsed_s=round(elapsed, 3)))
    for s, p in zip(staged, prefixes):  # every dataset is complete: only renames from here on
        staging.publish(s, p)
    for ki, key in enumerate(keys):
        if tally.empty[ki]:
            print(f"[preprocess] {key}: {tally.empty[ki]} empty documents (no tokens) dropped",
                  file=sys.stderr)
    if tally.skipped:
        print(f"[preprocess] skipped {tally.skipped} bad lines", file=sys.stderr)
    return reports


def _write_report(cfg, staged, prefix, key, tok, dtype, files, records, stats) -> dict:
    el = max(stats["elapsed_s"], 1e-9)
    report = {
        "dataset": prefix, "key": key, **stats,
        "docs_per_s": round(stats["docs"] / el, 1), "tokens_per_s": round(stats["tokens"] / el, 1),
        "inputs": [{"path": os.path.abspath(p), "records": n} for p, n in zip(files, records)],
        "tokenizer": tok.describe(), "dtype": np.dtype(dtype).name,
        "append_eod": cfg.append_eod, "prepend_bos": cfg.prepend_bos, "workers": cfg.workers,
        # the fingerprint hashes the content only: the staged files' is the published ones'
        "idx_fingerprint": idx_fingerprint(staged),
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    atomic_write_json(staging.report_path(staged), report, indent=2)
    return report
