"""The input side of the preprocessor: corpus files, decompressed and cut into batches of records.

JSON lines, plain or compressed (gzip, zstd, bzip2, xz: recognised by their magic bytes, not by
their names), or Parquet; files are read strictly in order.

A truncated or corrupt compressed stream (an interrupted download or copy) is an error of the whole
file, naming it, also with ``--skip-bad-lines``: that flag skips bad *lines* (invalid JSON, missing
keys) inside an intact stream, whereas a damaged stream would silently cut the corpus short (zstd's
streaming reader even reports a clean end of input in the middle of a frame).
"""

from __future__ import annotations

import glob
import gzip
import io
import lzma
import os
import zlib
from typing import NamedTuple

import numpy as np

from megasyne.errors import DataError


class PreprocessError(DataError, RuntimeError):
    """The run cannot proceed (bad input line, missing file, ...); the message names file and line."""


_BATCH_BYTES = 4 << 20  # a batch of records ends at this size at the latest
_READ_BLOCK = 4 << 20  # bytes read at a time when cutting a plain file into line ranges


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


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of every frame of a ``.zst`` file; EOFError if it ends inside a frame."""

    def __init__(self, path: str, zstandard) -> None:
        super().__init__()
        self._raw = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._frame = None
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            out = []
            while chunk:  # a chunk may finish one frame and start the next
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._out = memoryview(b"".join(out))
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _compression(path: str) -> str | None:
    """gzip / zstd / bzip2 / xz by the file's magic bytes (not its name); None: plain."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if magic[:3] == b"BZh":
        return "bzip2"
    if magic == b"\xfd7zXZ\x00":
        return "xz"
    return None


def _open_decompressed(path: str, kind: str):
    """(binary file of the decompressed bytes, errors a damaged stream raises) of a file
    compressed as ``kind`` (see :func:`_compression`)."""
    damaged = (EOFError, OSError)  # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors
    if kind == "gzip":
        return gzip.open(path, "rb"), damaged + (zlib.error,)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise PreprocessError(f"{path}: zstd-compressed, but the 'zstandard' package is not "
                                  "installed (pip install zstandard)") from None
        reader = io.BufferedReader(_ZstdFrames(path, zstandard), buffer_size=1 << 20)
        return reader, damaged + (zstandard.ZstdError,)
    if kind == "bzip2":
        import bz2
        return bz2.open(path, "rb"), damaged
    if kind == "xz":
        return lzma.open(path, "rb"), damaged + (lzma.LZMAError,)
    raise ValueError(f"{path}: unknown compression {kind!r}")


def is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _damaged(path: str, what: str, where: str, exc: BaseException) -> PreprocessError:
    return PreprocessError(
        f"{path}: truncated or corrupt {what} ({where}: {type(exc).__name__}: {exc}); the file is "
        "damaged (an interrupted download or copy?): fetch or write it again. This fails the run "
        "even with --skip-bad-lines, which skips bad lines inside an intact file.")


def _iter_parquet(path: str, columns: list[str]):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PreprocessError(f"{path}: Parquet input needs the 'pyarrow' package") from None
    row = 0
    try:
        pf = pq.ParquetFile(path)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=1024, columns=present):
            for rec in batch.to_pylist():  # a missing column becomes a missing key, per row
                row += 1
                yield row, rec
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, "Parquet file", f"after row {row}", exc) from None


class LineRange(NamedTuple):
    """Lines of a plain file to read in a worker: bytes [start, end), numbered from ``first``."""

    path: str
    first: int
    start: int
    end: int


class LineBlock(NamedTuple):
    """Lines of a compressed file, decompressed by the main process, numbered from ``first``."""

    path: str
    first: int
    data: bytes


class RowBatch(NamedTuple):
    """Parquet rows (dicts of the needed columns) with their row numbers."""

    nums: list[int]
    rows: list[dict]

    @property
    def first(self) -> int:
        return self.nums[0]


def _cut_lines(read, batch_lines: int, batch_bytes: int, keep: bool):
    """(first line number, start, end, the bytes [start, end) if ``keep``) of a byte stream.

    A piece ends after ``batch_lines`` lines (blank ones included) or at the first line that
    takes it to ``batch_bytes`` or more, whichever comes first; together the pieces cover the
    stream exactly once, the last one ending where it ends (a last line without a newline
    included). Newlines are found with numpy over ``_READ_BLOCK`` blocks (~1 ms per MiB,
    whatever the lines' length) and cuts by binary search: the cost is per block and per piece,
    never per line. The lines themselves are split and parsed by whoever takes the piece.
    """
    first, start = 1, 0  # the next piece's first line number and start offset
    pending = 0  # complete lines in [start, base) that no piece holds yet
    base = 0  # stream offset of the current block
    carry = b""  # with keep: the bytes [start, base)
    while block := read(_READ_BLOCK):
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + (base + 1)  # line ends
        i = 0  # the first line end of this block that no piece holds yet
        while True:
            by_lines = i + batch_lines - pending - 1
            by_bytes = i + int(np.searchsorted(ends[i:], start + batch_bytes))
            j = min(by_lines, by_bytes)
            if j >= len(ends):
                pending += len(ends) - i
                break
            end = int(ends[j])
            data = None
            if keep:
                data = block[start - base:end - base] if start >= base else \
                    carry + block[:end - base]
            yield first, start, end, data
            first += pending + j - i + 1
            start, pending, i = end, 0, j + 1
        if keep:
            carry = block[start - base:] if start >= base else carry + block
        base += len(block)
    if base > start:
        yield first, start, base, carry if keep else None


def line_ranges(path: str, batch_lines: int, batch_bytes: int = _BATCH_BYTES):
    """(first line number, start, end): a plain file cut into ranges of whole lines.

    The main process does only this, which is what lets the preprocessor's workers read their
    own input (:func:`read_line_range`) instead of receiving it through a pipe.
    """
    with open(path, "rb", buffering=0) as f:
        for first, start, end, _ in _cut_lines(f.read, batch_lines, batch_bytes, keep=False):
            yield first, start, end


def line_blocks(path: str, kind: str, batch_lines: int, batch_bytes: int = _BATCH_BYTES):
    """:class:`LineBlock` s of the decompressed lines of ``path``, compressed as ``kind`` (see
    :func:`_cut_lines`).

    A truncated or corrupt stream raises a PreprocessError naming the file (see _damaged).
    """
    f, damaged = _open_decompressed(path, kind)
    last = 0
    with f:
        try:
            for first, _, _, data in _cut_lines(f.read, batch_lines, batch_bytes, keep=True):
                last = first
                yield LineBlock(path, first, data)
        except damaged as exc:
            raise _damaged(path, f"{kind} stream", f"after line {last}", exc) from None


def read_line_range(path: str, start: int, end: int, fds: dict) -> tuple[list[bytes], bool]:
    """The lines of ``path`` in bytes [start, end) (from :func:`line_ranges`), as
    :func:`split_lines` gives them.

    ``fds`` caches an open descriptor per path across calls. A range that cannot be read whole
    means the file shrank since it was cut into ranges: an error naming the file, not a short
    corpus.
    """
    try:
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, end - start, start)
    except OSError as exc:
        raise _damaged(path, "file", f"bytes {start}-{end}", exc) from None
    if len(data) != end - start:
        raise PreprocessError(f"{path}: the file changed while it was being read (bytes "
                              f"{start}-{end} of it are gone); rerun on a file nobody writes to")
    return split_lines(data)


def split_lines(data: bytes) -> tuple[list[bytes], bool]:
    """The lines of ``data`` without their newline, and whether the last one had one (every
    piece's last line does, except maybe a file's last line)."""
    lines = data.split(b"\n")
    ends_with_newline = lines[-1] == b""
    if ends_with_newline:
        lines.pop()
    return lines, ends_with_newline


def batches(files: list[str], columns: list[str], batch_size: int):
    """(file index, task): the whole input as tasks of <= batch_size lines, each numbered from
    its ``first`` line (or row).

    - a plain file: ``LineRange`` s; the worker reads its lines itself (:func:`read_line_range`)
    - a compressed file: ``LineBlock`` s, decompressed here (a stream can only be read from its
      start) but never split into lines here
    - Parquet: ``RowBatch`` es of row dicts, with their row numbers
    The worker returns the line numbers of the records it found in a task.
    """
    for fi, path in enumerate(files):
        if is_parquet(path):
            nums, rows = [], []
            for num, row in _iter_parquet(path, columns):
                nums.append(num)
                rows.append(row)
                if len(rows) >= batch_size:
                    yield fi, RowBatch(nums, rows)
                    nums, rows = [], []
            if rows:
                yield fi, RowBatch(nums, rows)
        elif (kind := _compression(path)) is None:
            try:
                for first, start, end in line_ranges(path, batch_size):
                    yield fi, LineRange(path, first, start, end)
            except OSError as exc:
                raise _damaged(path, "file", "while cutting it into batches", exc) from None
        else:
            for block in line_blocks(path, kind, batch_size):
                yield fi, block
