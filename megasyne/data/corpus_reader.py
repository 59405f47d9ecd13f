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

from megasyne.errors import DataError


class PreprocessError(DataError, RuntimeError):
    """The run cannot proceed (bad input line, missing file, ...); the message names file and line."""


_BATCH_BYTES = 4 << 20


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


def _open_decompressed(path: str):
    """(format name, binary file of the decompressed bytes, errors a damaged stream raises)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    damaged = (EOFError, OSError)  # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors
    if magic[:2] == b"\x1f\x8b":
        return "gzip", gzip.open(path, "rb"), damaged + (zlib.error,)
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise PreprocessError(f"{path}: zstd-compressed, but the 'zstandard' package is not "
                                  "installed (pip install zstandard)") from None
        reader = io.BufferedReader(_ZstdFrames(path, zstandard), buffer_size=1 << 20)
        return "zstd", reader, damaged + (zstandard.ZstdError,)
    if magic[:3] == b"BZh":
        import bz2
        return "bzip2", bz2.open(path, "rb"), damaged
    if magic == b"\xfd7zXZ\x00":
        return "xz", lzma.open(path, "rb"), damaged + (lzma.LZMAError,)
    return "text", open(path, "rb", buffering=1 << 20), (OSError,)


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


def iter_records(path: str, columns: list[str], counts: dict):
    """(location number, payload): raw JSON bytes by line number, or Parquet row dicts by row."""
    if is_parquet(path):
        yield from _iter_parquet(path, columns)
        return
    kind, f, damaged = _open_decompressed(path)
    lineno = 0
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.isspace():
                    counts["blank_lines"] += 1
                    continue
                yield lineno, line
        except damaged as exc:
            what = "file" if kind == "text" else f"{kind} stream"
            raise _damaged(path, what, f"after line {lineno}", exc) from None


def batches(files: list[str], columns: list[str], batch_size: int, counts: dict):
    """(file index, line numbers, payloads) with <= batch_size records of one file each."""
    for fi, path in enumerate(files):
        nums, payloads, nbytes = [], [], 0
        for num, payload in iter_records(path, columns, counts):
            nums.append(num)
            payloads.append(payload)
            nbytes += len(payload) if isinstance(payload, bytes) else 0
            if len(payloads) >= batch_size or nbytes >= _BATCH_BYTES:
                yield fi, nums, payloads
                nums, payloads, nbytes = [], [], 0
        if payloads:
            yield fi, nums, payloads
