"""Megatron-compatible ``.bin``/``.idx`` token datasets: a streaming writer and a validating reader.

Layout (byte-compatible with ``megatron.core.datasets.indexed_dataset``)::

    <prefix>.bin   raw tokens of every sequence, back to back, in the dataset's dtype
    <prefix>.idx   b"MMIDIDX\\x00\\x00"            9 bytes  magic
                   <Q version = 1                8 bytes
                   <B dtype code (DTYPE_CODES)   1 byte
                   <Q sequence count n           8 bytes
                   <Q document count d + 1       8 bytes  (length of document_indices)
                   int32[n]   sequence lengths (tokens)
                   int64[n]   sequence byte pointers into .bin
                   int64[d+1] document indices (sequence index where each document starts; last = n)
                   [int8[n]   sequence modes, only in Megatron's "multimodal" datasets]

We write one sequence per document (Megatron's GPT data with ``--split-sentences`` off), so
``document_indices == arange(n + 1)``.

Why not Megatron's ``IndexedDatasetBuilder``: it keeps every length in Python lists (~36 B per
document, growing with the corpus) and writes ``.bin``/``.idx`` in place, so a crash leaves a
half-written pair that later readers happily mmap. :class:`IndexedDatasetWriter` spills lengths to
disk in fixed-size numpy chunks (peak memory independent of corpus size) and publishes both files
by atomic renames only once complete, ``.idx`` last.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import uuid
import weakref
from dataclasses import dataclass

import numpy as np

from megasyne.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

# Megatron's DType enum, keyed by numpy scalar type (np.uint16, not np.dtype("uint16"): the two
# compare equal but hash differently). Use dtype_code()/dtype_from_code() for any dtype-like.
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES: dict[int, type] = {code: t for t, code in DTYPE_CODES.items()}

_LENGTH_CHUNK = 1 << 16  # lengths buffered in RAM before spilling: 64 Ki x int64 = 512 KiB
_IO_CHUNK = 1 << 16  # elements per chunk when streaming lengths/pointers into the .idx (~2 MiB peak)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("megasyne.data.indexed_dataset assumes a little-endian host (as Megatron)")


class IndexedDatasetError(DataError, ValueError):
    """A ``.bin``/``.idx`` pair is missing, malformed or inconsistent (the message names the file)."""


def best_token_dtype(vocab_size: int) -> type:
    """Smallest token dtype Megatron uses for a vocabulary: uint16 below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    """Megatron's ``.idx`` code for a dtype-like (np.uint16, "uint16", np.dtype("<u2"), ...)."""
    t = np.dtype(dtype).type
    if t not in DTYPE_CODES:
        raise IndexedDatasetError(f"dtype {np.dtype(dtype)} has no Megatron .idx code; use one "
                                  f"of {sorted(np.dtype(k).name for k in DTYPE_CODES)}")
    return DTYPE_CODES[t]


def dtype_from_code(code: int) -> np.dtype:
    if code not in CODE_DTYPES:
        raise IndexedDatasetError(f"unknown Megatron dtype code {code} "
                                  f"(known: {sorted(CODE_DTYPES)})")
    return np.dtype(CODE_DTYPES[code]).newbyteorder("<")


def bin_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".idx"


def _unlink_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


@dataclass(frozen=True, kw_only=True)
class WriteSummary:
    prefix: str
    num_documents: int
    num_tokens: int
    dtype: np.dtype


class IndexedDatasetWriter:
    """Stream documents into ``<prefix>.bin``/``<prefix>.idx`` with memory independent of their count.

    Usage::

        with IndexedDatasetWriter("out/web_text_document", np.uint16) as w:
            for tokens in docs:
                w.add_document(tokens)
        # finalize() runs on a clean exit; on an exception both temps are removed and nothing
        # appears at <prefix>.bin/.idx (an existing pair there is left untouched).

    Tokens go straight to ``<prefix>.bin.tmp.<pid>.<rand>``; lengths are buffered in a fixed numpy
    chunk and spilled to ``<prefix>.lengths.tmp.*``. ``finalize()`` streams the ``.idx`` from the spill
    (pointers via a running cumsum, chunk by chunk), then renames ``.bin`` and finally ``.idx``.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._code = dtype_code(self.dtype)
        if self.dtype.kind not in "iu":
            raise IndexedDatasetError(f"{self.prefix}: token dtype must be an integer type, "
                                      f"got {self.dtype}")
        self._info = np.iinfo(self.dtype)
        parent = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(parent, exist_ok=True)
        tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._bin_tmp = f"{self.prefix}.bin.tmp.{tag}"
        self._len_tmp = f"{self.prefix}.lengths.tmp.{tag}"
        self._idx_tmp = f"{self.prefix}.idx.tmp.{tag}"
        self._bin = open(self._bin_tmp, "wb", buffering=1 << 20)
        self._lens_file = open(self._len_tmp, "wb")
        # Removes the temps if the writer is dropped (or the interpreter exits) unfinished.
        self._cleanup = weakref.finalize(self, _abort_files, self._bin, self._lens_file,
                                         (self._bin_tmp, self._len_tmp, self._idx_tmp))
        self._lens = np.empty(_LENGTH_CHUNK, dtype=np.int64)
        self._nbuf = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._state = "open"  # -> "finalized" | "aborted"

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    # -- writing ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.prefix}: writer already {self._state}")

    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and arr.dtype.kind in "iub":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._info.min or hi > self._info.max:
                    bad = lo if lo < self._info.min else hi
                    raise IndexedDatasetError(f"{self.prefix}: token id {bad} does not fit the "
                                              f"dataset dtype {self.dtype.name}")
            elif arr.size and arr.dtype.kind not in "iub":
                raise IndexedDatasetError(f"{self.prefix}: tokens must be integers, got dtype "
                                          f"{arr.dtype}")
            arr = arr.astype(self.dtype)
        return np.ascontiguousarray(arr)

    def _push_length(self, n: int) -> None:
        self._lens[self._nbuf] = n
        self._nbuf += 1
        if self._nbuf == _LENGTH_CHUNK:
            self._lens_file.write(memoryview(self._lens))
            self._nbuf = 0

    def add_document(self, tokens) -> None:
        """Append one document (= one sequence). ``tokens``: 1-D integer array or list, non-empty."""
        self._check_open()
        arr = self._as_tokens(tokens)
        if arr.ndim != 1:
            raise IndexedDatasetError(f"{self.prefix}: a document must be 1-D, got shape "
                                      f"{arr.shape}")
        if arr.size == 0:
            raise IndexedDatasetError(f"{self.prefix}: empty document (document "
                                      f"{self.num_documents}); empty documents are never "
                                      "written, drop them before")
        if arr.size > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.prefix}: document of {arr.size} tokens exceeds "
                                      "int32 lengths")
        self._bin.write(memoryview(arr))
        self._push_length(arr.size)
        self.num_documents += 1
        self.num_tokens += arr.size

    def add_documents(self, flat_tokens, lengths) -> None:
        """Append many documents at once: ``flat_tokens`` [sum(lengths)] cut by ``lengths`` [k] (> 0)."""
        self._check_open()
        lengths = np.asarray(lengths, dtype=np.int64)
        arr = self._as_tokens(flat_tokens)
        if lengths.ndim != 1 or arr.ndim != 1:
            raise IndexedDatasetError(f"{self.prefix}: add_documents wants 1-D tokens and lengths")
        if lengths.size and (lengths.min() <= 0 or lengths.max() > np.iinfo(np.int32).max):
            raise IndexedDatasetError(f"{self.prefix}: add_documents lengths must be in "
                                      "[1, 2**31); empty documents are never written, drop them "
                                      "before")
        if int(lengths.sum()) != arr.size:
            raise IndexedDatasetError(f"{self.prefix}: lengths sum to {int(lengths.sum())} but "
                                      f"{arr.size} tokens were given")
        self._bin.write(memoryview(arr))
        done = 0
        while done < lengths.size:  # fill the chunk buffer, spilling each time it is full
            take = min(_LENGTH_CHUNK - self._nbuf, lengths.size - done)
            self._lens[self._nbuf:self._nbuf + take] = lengths[done:done + take]
            self._nbuf += take
            done += take
            if self._nbuf == _LENGTH_CHUNK:
                self._lens_file.write(memoryview(self._lens))
                self._nbuf = 0
        self.num_documents += int(lengths.size)
        self.num_tokens += arr.size

    # -- completion ------------------------------------------------------------------------
    def finalize(self) -> WriteSummary:
        """Write the ``.idx`` and publish the pair (``.bin`` renamed first, ``.idx`` last)."""
        self._check_open()
        try:
            self._lens_file.write(memoryview(self._lens[:self._nbuf]))
            self._lens_file.close()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._write_idx()
            # A reader must never pair the new .bin with an old .idx: drop the old .idx first.
            _unlink_quietly(idx_path(self.prefix))
            os.replace(self._bin_tmp, bin_path(self.prefix))
            os.replace(self._idx_tmp, idx_path(self.prefix))
            _unlink_quietly(self._len_tmp)
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        self._cleanup.detach()
        return WriteSummary(prefix=self.prefix, num_documents=self.num_documents,
                            num_tokens=self.num_tokens, dtype=self.dtype)

    def _write_idx(self) -> None:
        n, itemsize = self.num_documents, self.dtype.itemsize
        with open(self._idx_tmp, "wb", buffering=1 << 20) as out:
            out.write(INDEX_MAGIC)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", self._code))
            out.write(struct.pack("<Q", n))
            out.write(struct.pack("<Q", n + 1))
            spilled = np.memmap(self._len_tmp, dtype=np.int64, mode="r") if n else np.empty(0, np.int64)
            for s in range(0, n, _IO_CHUNK):  # int32 lengths
                out.write(memoryview(spilled[s:s + _IO_CHUNK].astype(np.int32)))
            base = 0
            for s in range(0, n, _IO_CHUNK):  # int64 byte pointers = exclusive cumsum * itemsize
                chunk = spilled[s:s + _IO_CHUNK] * itemsize
                ends = np.cumsum(chunk)
                ends += base
                ends -= chunk  # now the starts
                out.write(memoryview(ends))
                base = int(ends[-1] + chunk[-1])
                del chunk, ends  # free before the next chunk: peak = one chunk, whatever n
            for s in range(0, n + 1, _IO_CHUNK):  # document indices: one sequence per document
                out.write(memoryview(np.arange(s, min(s + _IO_CHUNK, n + 1), dtype=np.int64)))
            del spilled
            out.flush()
            os.fsync(out.fileno())
        if base != self.num_tokens * itemsize:  # the spill must agree with what we counted
            raise IndexedDatasetError(f"{self.prefix}: internal error, lengths spill sums to "
                                      f"{base} bytes, expected {self.num_tokens * itemsize}")

    def abort(self) -> None:
        """Drop everything written so far; ``<prefix>.bin/.idx`` are not touched."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        self._cleanup()


def _abort_files(bin_file, lens_file, paths) -> None:
    for f in (bin_file, lens_file):
        try:
            f.close()
        except Exception:  # pragma: no cover - closing during teardown
            pass
    _unlink_quietly(*paths)


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron ``.bin``/``.idx`` pair, validated on open.

    ``len(ds)`` is the number of sequences (= documents for data we write);
    ``ds.document_indices`` [d+1] maps documents to sequence ranges, as in Megatron.
    ``get``/``[]`` return read-only views into the mmap (copy them to keep beyond ``ds``).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        self.idx_file, self.bin_file = idx_path(self.prefix), bin_path(self.prefix)
        for f in (self.idx_file, self.bin_file):
            if not os.path.isfile(f):
                raise IndexedDatasetError(f"{f}: no such file (dataset prefix {self.prefix!r})")
        idx_size = os.path.getsize(self.idx_file)
        if idx_size < HEADER_SIZE:
            raise IndexedDatasetError(f"{self.idx_file}: truncated .idx ({idx_size} bytes, the "
                                      f"header alone is {HEADER_SIZE})")
        with open(self.idx_file, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head[:9] != INDEX_MAGIC:
            raise IndexedDatasetError(f"{self.idx_file}: bad magic {head[:9]!r}, expected "
                                      f"{INDEX_MAGIC!r}: not a Megatron .idx file")
        version, code, n, d1 = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{self.idx_file}: unsupported .idx version {version} "
                                      f"(expected {INDEX_VERSION})")
        try:
            self.dtype = dtype_from_code(code)
        except ValueError as exc:
            raise IndexedDatasetError(f"{self.idx_file}: {exc}") from None
        if d1 < 1:
            raise IndexedDatasetError(f"{self.idx_file}: document count field is 0 "
                                      "(must be documents + 1)")
        expected = HEADER_SIZE + n * 4 + n * 8 + d1 * 8
        if idx_size not in (expected, expected + n):  # + n: Megatron multimodal sequence modes
            what = "truncated" if idx_size < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{self.idx_file}: {what}: {idx_size} bytes, but the header ({n} sequences, "
                f"{d1 - 1} documents) implies {expected}")
        self._idx_mmap = np.memmap(self.idx_file, dtype=np.uint8, mode="r")
        buf = self._idx_mmap
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=off)
        off += n * 4
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=off)
        off += n * 8
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=d1, offset=off)
        off += d1 * 8
        self.sequence_modes = (np.frombuffer(buf, dtype=np.int8, count=n, offset=off)
                               if idx_size == expected + n else None)
        if self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise IndexedDatasetError(
                f"{self.idx_file}: document indices must run from 0 to {n} (sequences), got "
                f"{int(self.document_indices[0])}..{int(self.document_indices[-1])}")
        bin_size = os.path.getsize(self.bin_file)
        end = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
               if n else 0)
        if end != bin_size:
            raise IndexedDatasetError(
                f"{self.bin_file}: size {bin_size} bytes does not match the .idx, whose last "
                f"sequence ends at byte {end} ({self.idx_file}); the pair is from different runs "
                "or was cut short")
        # np.memmap refuses empty files: an empty dataset gets an empty array instead.
        self._bin = (np.memmap(self.bin_file, dtype=self.dtype, mode="r") if bin_size
                     else np.empty(0, dtype=self.dtype))
        self._num_tokens: int | None = None

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        if self._num_tokens is None:
            self._num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        return self._num_tokens

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range [0, {n})")
        i = int(i) % n
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) outside "
                             f"sequence {i} of length {size}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def validate(self) -> None:
        """Full O(n) check (opening only checks O(1) facts): contiguous pointers, sorted documents."""
        n, itemsize = len(self), self.dtype.itemsize
        if n and int(self.sequence_lengths.min()) < 0:
            raise IndexedDatasetError(f"{self.idx_file}: negative sequence length")
        base = 0
        for s in range(0, n, _IO_CHUNK):
            chunk = self.sequence_lengths[s:s + _IO_CHUNK].astype(np.int64) * itemsize
            ends = np.cumsum(chunk) + base
            if not np.array_equal(self.sequence_pointers[s:s + _IO_CHUNK], ends - chunk):
                raise IndexedDatasetError(f"{self.idx_file}: sequence pointers in [{s}, "
                                          f"{s + chunk.size}) do not follow the lengths")
            base = int(ends[-1])
        if np.any(np.diff(self.document_indices) < 0):
            raise IndexedDatasetError(f"{self.idx_file}: document indices are not sorted")

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, dtype={self.dtype.name}, sequences={len(self)}, "
                f"documents={self.num_documents})")


_FINGERPRINTS: dict[tuple, str] = {}


def idx_fingerprint(prefix: str | os.PathLike) -> str:
    """``"<sha256 of the .idx bytes>-<.bin size>"``: changes whenever the dataset's content does.

    The ``.idx`` holds every length and pointer, so any change of document count, order or length
    changes its hash; the ``.bin`` size catches a ``.bin`` swapped under an unchanged ``.idx``.
    Cached per process on (path, inode, size, mtime) of both files, so repeated calls are free.
    """
    ip, bp = idx_path(prefix), bin_path(prefix)
    try:
        si, sb = os.stat(ip), os.stat(bp)
    except FileNotFoundError as exc:
        raise IndexedDatasetError(f"{exc.filename}: no such file (dataset prefix "
                                  f"{os.fspath(prefix)!r})") from None
    key = (os.path.realpath(ip), si.st_ino, si.st_size, si.st_mtime_ns, sb.st_size, sb.st_mtime_ns)
    fp = _FINGERPRINTS.get(key)
    if fp is None:
        h = hashlib.sha256()
        with open(ip, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        fp = _FINGERPRINTS[key] = f"{h.hexdigest()}-{sb.st_size}"
    return fp


def exists(prefix: str | os.PathLike) -> bool:
    """Both files of the pair are present (the writer publishes ``.idx`` last)."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


__all__ = [
    "DTYPE_CODES", "CODE_DTYPES", "IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter",
    "WriteSummary", "best_token_dtype", "bin_path", "dtype_code", "dtype_from_code", "exists",
    "idx_fingerprint", "idx_path",
]

