"""Tokenise JSON-lines / Parquet corpora into Megatron ``.bin``/``.idx`` datasets (+ metadata sidecar).

One dataset per JSON key, named as Megatron's ``tools/preprocess_data.py`` does:
``<output_prefix>_<key>_document`` (``--split-sentences`` is not supported: one sequence per document).

Pipeline (memory bounded, independent of corpus size)::

    main process: read lines (.jsonl, .gz, .zst, .bz2, .xz) or Parquet rows, in input order
        -> batches of <= batch_size records (one file per batch)
        -> workers (multiprocessing, each with its own tokenizer): JSON parse + encode
           -> per key: flat token array + lengths [records] (0 = empty or bad record)
        -> main, strictly in submission order: bad-record policy, then writer.add_documents
    At most 4 x workers batches are in flight: ``Pool.imap`` (Megatron's choice) has no such bound,
    its feeder thread reads the whole input ahead of slow workers.

Failure policy: a line that is not JSON, not an object, lacks a key, or has a non-string text /
non-scalar metadata value is *bad*. By default the first bad line aborts the run with
``<file>:<line>: <why>`` and nothing is published (writers are atomic). With ``skip_bad_lines`` bad
lines are dropped from every key's dataset, counted and listed (first 20) in the report. Documents
with no tokens are counted as ``empty`` and never written (per key). Blank lines are ignored.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import glob
import gzip
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megasyne.data.indexed_dataset import IndexedDatasetWriter, best_token_dtype, idx_fingerprint
from megasyne.data.metadata import FIELD_NAME_RE as _FIELD_NAME
from megasyne.data.metadata import write_metadata_field
from megasyne.data.tokenizers import load_tokenizer
from megasyne.errors import DataError

_MAX_BAD_EXAMPLES = 20
_META_CHUNK = 1 << 16
_BATCH_BYTES = 4 << 20


class PreprocessError(DataError, RuntimeError):
    """The run cannot proceed (bad input line, missing file, ...); the message names file and line."""


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[str]  # files, globs or directories, in order
    output_prefix: str
    tokenizer: str  # path or spec, see megasyne.data.tokenizers.load_tokenizer
    tokenizer_kind: str | None = None  # force/validate: hf | sentencepiece | tiktoken
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    metadata_keys: list[str] = field(default_factory=list)
    append_eod: bool = False
    prepend_bos: bool = False
    workers: int = 1
    skip_bad_lines: bool = False
    log_interval: int = 10000  # documents between log lines on stderr; 0: none
    batch_size: int = 256  # records per worker task
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


def dataset_prefix(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files from paths, globs (sorted) and directories (sorted, non-hidden files), de-duplicated."""
    out: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(os.path.join(pat, f) for f in os.listdir(pat)
                           if not f.startswith(".") and os.path.isfile(os.path.join(pat, f)))
        elif os.path.isfile(pat):
            found = [pat]
        else:
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        if not found:
            raise PreprocessError(f"--input {pat}: no such file, or no file matches")
        out.extend(p for p in found if p not in out)
    return out


# ---------------------------------------------------------------------------------------------
# Reading
def _open_decompressed(path: str):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise PreprocessError(f"{path}: zstd-compressed, but the 'zstandard' package is not "
                                  "installed (pip install zstandard)") from None
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    if magic[:3] == b"BZh":
        import bz2
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        import lzma
        return lzma.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _iter_records(path: str, columns: list[str], counts: dict):
    """(location number, payload): raw JSON bytes by line number, or Parquet row dicts by row."""
    if _is_parquet(path):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PreprocessError(f"{path}: Parquet input needs the 'pyarrow' package") from None
        pf = pq.ParquetFile(path)
        present = [c for c in columns if c in pf.schema_arrow.names]
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=present):
            for rec in batch.to_pylist():  # a missing column becomes a missing key, per row
                row += 1
                yield row, rec
        return
    with _open_decompressed(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.isspace():
                counts["blank_lines"] += 1
                continue
            yield lineno, line


def _batches(files: list[str], columns: list[str], batch_size: int, counts: dict):
    """(file index, line numbers, payloads) with <= batch_size records of one file each."""
    for fi, path in enumerate(files):
        nums, payloads, nbytes = [], [], 0
        for num, payload in _iter_records(path, columns, counts):
            nums.append(num)
            payloads.append(payload)
            nbytes += len(payload) if isinstance(payload, bytes) else 0
            if len(payloads) >= batch_size or nbytes >= _BATCH_BYTES:
                yield fi, nums, payloads
                nums, payloads, nbytes = [], [], 0
        if payloads:
            yield fi, nums, payloads


# ---------------------------------------------------------------------------------------------
# Worker side: parse + encode one batch
_W: dict = {}


class _Bad(DataError):
    """One bad input record; caught per record, then skipped or raised as a PreprocessError
    naming the file and line."""


def _init_worker(spec: dict) -> None:
    tok = load_tokenizer(spec["path"], kind=spec["kind"], eod=spec["eod_id"], bos=spec["bos_id"])
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


def _parse(payload, keys, meta_keys):
    """-> (texts per key, metadata values), or raise _Bad with the reason."""
    try:
        rec = json.loads(payload) if isinstance(payload, bytes) else payload
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


def _encode_batch(payloads: list):
    """-> (bad [(record, why)], lengths int64 [keys, records], flats [keys] of tokens, meta [records])."""
    tok, keys = _W["tok"], _W["json_keys"]
    head = [_W["bos_id"]] if _W["prepend_bos"] else []
    tail = [_W["eod_id"]] if _W["append_eod"] else []
    bad, meta, valid = [], [None] * len(payloads), []
    for r, payload in enumerate(payloads):
        try:
            texts, meta[r] = _parse(payload, keys, _W["metadata_keys"])
            valid.append((r, texts))
        except _Bad as exc:
            bad.append((r, str(exc)))
    try:  # one batched call per key (HF: encode_batch_fast, no offsets): ~20% faster than 1 by 1
        per_key = [tok.encode_batch([texts[ki] for _, texts in valid]) for ki in range(len(keys))]
        encoded = [(r, [ids[i] for ids in per_key]) for i, (r, _) in enumerate(valid)]
    except Exception:  # find the record(s) the tokenizer refuses, e.g. lone surrogates
        encoded = []
        for r, texts in valid:
            try:
                encoded.append((r, [tok.encode(t) for t in texts]))
            except Exception as exc:
                bad.append((r, f"tokenizer failed: {type(exc).__name__}: {exc}"))
                meta[r] = None
    lengths = np.zeros((len(keys), len(payloads)), dtype=np.int64)
    flats: list[list[int]] = [[] for _ in keys]
    for r, docs in encoded:
        for ki, doc in enumerate(docs):
            if doc:  # empty stays length 0: counted, never written (no lone BOS/EOD documents)
                flats[ki].extend(head)
                flats[ki].extend(doc)
                flats[ki].extend(tail)
                lengths[ki, r] = len(doc) + len(head) + len(tail)
    return bad, lengths, [np.array(f, dtype=_W["dtype"]) for f in flats], meta


def _drop_record(result, r: int) -> None:
    """Remove record r's tokens from every key of a batch result (rare: metadata type clash)."""
    _, lengths, flats, meta = result
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
def _results(cfg: PreprocessConfig, spec: dict, tok, batches):
    """Encoded batches in input order, with at most 4 x workers batches in flight."""
    if cfg.workers == 1:
        _W.update(spec, tok=tok)
        for fi, nums, payloads in batches:
            yield fi, nums, _encode_batch(payloads)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # Forked workers share the parent's heap (torch, megatron, ... when imported) copy-on-write;
    # the first full gc in any process writes every object's gc header and so copies the whole
    # heap, once per process (measured: +100 MB each, mid-run). Frozen objects are never scanned.
    gc.collect()
    gc.freeze()
    pool = mp.get_context(method).Pool(cfg.workers, initializer=_init_worker, initargs=(spec,))
    try:
        inflight: deque = deque()
        for fi, nums, payloads in batches:
            inflight.append((fi, nums, pool.apply_async(_encode_batch, (payloads,))))
            if len(inflight) >= 4 * cfg.workers:
                fi_, nums_, ar = inflight.popleft()
                yield fi_, nums_, ar.get()
        while inflight:
            fi_, nums_, ar = inflight.popleft()
            yield fi_, nums_, ar.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        gc.unfreeze()


def _loc(path: str, num: int, parquet: bool) -> str:
    return f"{path}: row {num}" if parquet else f"{path}:{num}"


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole pipeline; returns {key: report dict}. Raises PreprocessError on bad input."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked processes
    files = expand_inputs(cfg.inputs)
    tok = load_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_kind)
    if cfg.append_eod and tok.eod_id is None:
        raise PreprocessError(f"{tok.path}: --append-eod, but the tokenizer has no end-of-document "
                              "token")
    if cfg.prepend_bos and tok.bos_id is None:
        raise PreprocessError(f"{tok.path}: --prepend-bos, but the tokenizer has no BOS token")
    dtype = best_token_dtype(tok.vocab_size)
    spec = dict(path=tok.path, kind=tok.kind, eod_id=tok.eod_id, bos_id=tok.bos_id,
                json_keys=list(cfg.json_keys), metadata_keys=list(cfg.metadata_keys),
                append_eod=cfg.append_eod, prepend_bos=cfg.prepend_bos, dtype=dtype)
    parquet = [_is_parquet(p) for p in files]
    counts = {"blank_lines": 0}
    keys, mkeys = cfg.json_keys, cfg.metadata_keys
    prefixes = [dataset_prefix(cfg.output_prefix, k) for k in keys]
    docs, toks, empty = [0] * len(keys), [0] * len(keys), [0] * len(keys)
    records = [0] * len(files)
    skipped, bad_examples = 0, []
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    t0 = time.time()
    next_log = cfg.log_interval
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spill = tempfile.mkdtemp(prefix=".preprocess-spill-", dir=out_dir)
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(IndexedDatasetWriter(p, dtype)) for p in prefixes]
            columns = [[_MetaColumn(f"{ki}.{m}", spill) for m in mkeys] for ki in range(len(keys))]
            bar = None
            if progress:
                from tqdm import tqdm
                bar = stack.enter_context(tqdm(unit="doc", unit_scale=True, dynamic_ncols=True,
                                               desc="preprocess"))
            batches = _batches(files, list(keys) + list(mkeys), cfg.batch_size, counts)
            results = _results(cfg, spec, tok, batches)
            stack.callback(results.close)  # stops the pool before the writers abort
            for fi, nums, result in results:
                bad, lengths, flats, meta = result
                records[fi] += len(nums)
                bad_rows = [(r, why) for r, why in bad]
                if mkeys:  # a value whose type (number vs string) differs from the first one is bad
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
                                bad_rows.append((r, f"metadata key {mkeys[mi]!r} is a "
                                                 f"{c.kind_of(v)}, earlier values were {c.kind}s"))
                                _drop_record(result, r)
                                break
                for r, why in sorted(bad_rows):
                    where = _loc(files[fi], nums[r], parquet[fi])
                    if not cfg.skip_bad_lines:
                        raise PreprocessError(f"{where}: {why} (use --skip-bad-lines to skip bad "
                                              "lines)")
                    skipped += 1
                    if len(bad_examples) < _MAX_BAD_EXAMPLES:
                        bad_examples.append(f"{where}: {why}")
                        print(f"[preprocess] skipping {where}: {why}", file=sys.stderr)
                n_bad = len(bad_rows)
                for ki in range(len(keys)):
                    keep = lengths[ki] > 0
                    writers[ki].add_documents(flats[ki], lengths[ki][keep])
                    docs[ki] += int(keep.sum())
                    toks[ki] += int(flats[ki].size)
                    empty[ki] += len(nums) - n_bad - int(keep.sum())
                    for r in np.flatnonzero(keep) if mkeys else ():
                        for mi, v in enumerate(meta[r]):
                            columns[ki][mi].append(v)
                if bar is not None:
                    bar.update(len(nums))
                    rate = toks[0] / max(time.time() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                if cfg.log_interval and docs[0] >= next_log:
                    dt = max(time.time() - t0, 1e-9)
                    print(f"[preprocess] {docs[0]:,} docs, {toks[0]:,} tokens, "
                          f"{docs[0] / dt:,.0f} docs/s, {toks[0] / dt:,.0f} tokens/s",
                          file=sys.stderr)
                    next_log = (docs[0] // cfg.log_interval + 1) * cfg.log_interval
            for w in writers:
                w.finalize()
        elapsed = time.time() - t0
        reports = {}
        for ki, key in enumerate(keys):
            fields = {}
            for mi, m in enumerate(mkeys):
                values, cats = columns[ki][mi].finish()
                write_metadata_field(prefixes[ki], m, values, description=f"JSON key {m!r} of the "
                                     "input, copied by preprocess_data.py", categories=cats,
                                     written_by="tools/preprocess_data.py")
                fields[m] = {"dtype": values.dtype.name, "categories": len(cats) if cats else None}
                del values
            reports[key] = _write_report(cfg, prefixes[ki], key, tok, dtype, files, records, dict(
                docs=docs[ki], tokens=toks[ki], skipped=skipped, empty=empty[ki],
                blank_lines=counts["blank_lines"], bad_examples=bad_examples, metadata=fields,
                elapsed_s=round(elapsed, 3)))
            if empty[ki]:
                print(f"[preprocess] {key}: {empty[ki]} empty documents (no tokens) dropped",
                      file=sys.stderr)
        if skipped:
            print(f"[preprocess] skipped {skipped} bad lines", file=sys.stderr)
        return reports
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _write_report(cfg, prefix, key, tok, dtype, files, records, stats) -> dict:
    el = max(stats["elapsed_s"], 1e-9)
    report = {
        "dataset": prefix, "key": key, **stats,
        "docs_per_s": round(stats["docs"] / el, 1), "tokens_per_s": round(stats["tokens"] / el, 1),
        "inputs": [{"path": os.path.abspath(p), "records": n} for p, n in zip(files, records)],
        "tokenizer": tok.describe(), "dtype": np.dtype(dtype).name,
        "append_eod": cfg.append_eod, "prepend_bos": cfg.prepend_bos, "workers": cfg.workers,
        "idx_fingerprint": idx_fingerprint(prefix),
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = prefix + ".report.json"
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return report
