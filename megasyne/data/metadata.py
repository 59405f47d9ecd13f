"""Per-document metadata sidecar of a ``.bin``/``.idx`` dataset (perplexity, topic, language, source).

On disk, next to ``<prefix>.bin``/``<prefix>.idx``::

    <prefix>.meta/
        manifest.json      {"format": "megasyne-meta/1",
                            "num_documents": d,
                            "idx_fingerprint": "<fingerprint of the .idx when last written>",
                            "fields": {"ppl": {"dtype": "float32", "description": "...",
                                               "written_by": "user@host pid 123 score_ppl.py",
                                               "written_at": "2026-11-27T01:02:03Z",
                                               "idx_fingerprint": "<sha256>-<bin size>",
                                               "num_documents": d,
                                               "categories": ["en", "zh"]   # categorical only
                                               }, ...}}
        ppl.npy            float32 [d]
        topic.npy          int16   [d]
        lang.npy           int8    [d]  codes into manifest categories

Each ``<field>.npy`` is a numeric 1-D array with one value per *document* of the dataset, in
document order (``document_indices`` order, i.e. the order the preprocessor wrote them).
String-valued fields are categorical: stored as integer codes into the field's ``categories`` list.

Staleness: every field records :func:`~megasyne.data.indexed_dataset.idx_fingerprint` of the dataset
at the time it was written. :func:`read_metadata_field` recomputes it and refuses a field written for
another version of the dataset (re-tokenised, re-ordered, re-filtered) instead of silently
misaligning perplexities with documents.

Atomicity: each ``.npy`` is written to a temp file and renamed; the manifest is updated by
read-modify-write under an exclusive ``flock`` (several scorers may write different fields of one
sidecar at once) and also published by rename. A field appears only once both are in place.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import socket
import sys
from contextlib import contextmanager

import numpy as np

from megasyne.atomic import atomic_write
from megasyne.data.indexed_dataset import IndexedDataset, idx_fingerprint
from megasyne.errors import DataError

FORMAT = "megasyne-meta/1"
MANIFEST = "manifest.json"
FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_CHUNK = 1 << 20


class MetadataError(DataError, ValueError):
    """A sidecar field is missing, malformed, misaligned or stale (the message names the file)."""


def meta_dir(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".meta"


def _field_path(prefix, name: str) -> str:
    return os.path.join(meta_dir(prefix), f"{name}.npy")


def _default_writer() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "?"
    return f"{user}@{socket.gethostname()} pid {os.getpid()} {os.path.basename(sys.argv[0] or '?')}"


def _read_manifest(prefix) -> dict:
    path = os.path.join(meta_dir(prefix), MANIFEST)
    if not os.path.isfile(path):
        return {"format": FORMAT, "fields": {}}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise MetadataError(f"{path}: unknown sidecar format {manifest.get('format')!r}, "
                            f"expected {FORMAT!r}")
    return manifest


@contextmanager
def _locked(prefix):
    os.makedirs(meta_dir(prefix), exist_ok=True)
    with open(os.path.join(meta_dir(prefix), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _encode_categories(name: str, values, categories):
    """Strings -> (int codes, categories). Codes use the smallest signed int type that fits."""
    values = np.asarray(values, dtype=object)
    if categories is None:
        categories = sorted({str(v) for v in values.tolist()})
    categories = [str(c) for c in categories]
    if len(set(categories)) != len(categories):
        raise MetadataError(f"metadata field {name!r}: duplicate categories")
    lookup = {c: i for i, c in enumerate(categories)}
    dtype = np.int8 if len(categories) <= 127 else np.int16 if len(categories) <= 32767 else np.int32
    codes = np.empty(values.shape[0], dtype=dtype)
    for i, v in enumerate(values.tolist()):
        if not isinstance(v, str):
            raise MetadataError(f"metadata field {name!r}: value {i} is {v!r}, not a string")
        if v not in lookup:
            raise MetadataError(f"metadata field {name!r}: value {i} {v!r} is not one of "
                                f"the categories {categories[:20]}")
        codes[i] = lookup[v]
    return codes, categories


def write_metadata_field(prefix: str | os.PathLike, name: str, values, description: str = "", *,
                         allow_nan: bool = False, categories: list[str] | None = None,
                         written_by: str | None = None) -> str:
    """Write ``<prefix>.meta/<name>.npy`` (one value per document) and record it in the manifest.

    ``values``: numeric 1-D array-like of length = number of documents (a ``np.memmap`` works and is
    streamed), or strings, stored as codes into ``categories`` (given, or the sorted distinct values);
    integer ``values`` with ``categories`` given are taken as codes already. NaN is refused unless
    ``allow_nan`` (a NaN perplexity would silently sort anywhere). Returns the ``.npy`` path.
    """
    prefix = os.fspath(prefix)
    if not FIELD_NAME_RE.match(name) or name in ("manifest", ".lock"):
        raise MetadataError(f"metadata field name {name!r} must match {FIELD_NAME_RE.pattern}")
    ds = IndexedDataset(prefix)
    n = ds.num_documents
    fingerprint = idx_fingerprint(prefix)
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.dtype.kind in "UOS":
        arr, categories = _encode_categories(name, arr, categories)
    elif categories is not None:
        categories = [str(c) for c in categories]
        if arr.dtype.kind not in "iu":
            raise MetadataError(f"metadata field {name!r}: categories given but values are "
                                f"{arr.dtype}, not strings or integer codes")
        if arr.size and (arr.min() < 0 or arr.max() >= len(categories)):
            raise MetadataError(f"metadata field {name!r}: codes outside [0, {len(categories)})")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int8)
    if arr.dtype.kind not in "iuf":
        raise MetadataError(f"metadata field {name!r}: values must be numeric or strings, "
                            f"got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise MetadataError(f"metadata field {name!r}: values must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise MetadataError(f"metadata field {name!r}: {arr.shape[0]} values but {ds.idx_file} "
                            f"has {n} documents")
    if arr.dtype.kind == "f" and not allow_nan:
        for s in range(0, n, _CHUNK):  # chunked: a memmap of 1e8 values stays out of RAM
            bad = np.flatnonzero(np.isnan(arr[s:s + _CHUNK]))
            if bad.size:
                raise MetadataError(f"metadata field {name!r}: NaN at document {s + int(bad[0])} "
                                    "(pass allow_nan=True to store NaN on purpose)")
    path = _field_path(prefix, name)
    entry = {
        "dtype": arr.dtype.name,
        "description": description,
        "written_by": written_by or _default_writer(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "idx_fingerprint": fingerprint,
        "num_documents": n,
    }
    if categories is not None:
        entry["categories"] = list(categories)
    with _locked(prefix):
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
        _update_manifest(prefix, n, fingerprint, {name: entry})
    return path


def _update_manifest(prefix, num_documents: int, fingerprint: str, fields: dict) -> None:
    """Add or replace ``fields`` in the manifest (call under ``_locked(prefix)``)."""
    manifest = _read_manifest(prefix)
    manifest.update(num_documents=num_documents, idx_fingerprint=fingerprint)
    manifest.setdefault("fields", {}).update(fields)
    manifest_path = os.path.join(meta_dir(prefix), MANIFEST)
    atomic_write(manifest_path, lambda f: f.write(
        (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()))


def move_metadata_fields(src_prefix: str | os.PathLike, dst_prefix: str | os.PathLike) -> list[str]:
    """Move every field of ``src_prefix``'s sidecar into ``dst_prefix``'s; returns their names.

    For publishing a dataset that was written, sidecar included, under a temporary prefix
    (megasyne.data.staging). A field keeps the fingerprint it was written with; the fingerprint
    depends only on the dataset's content, so the field is current once the dataset itself is
    at ``dst_prefix``. Renames only (same filesystem); ``dst_prefix``'s manifest is merged under
    its lock, and its other fields are kept.
    """
    src = _read_manifest(src_prefix)
    fields = src.get("fields", {})
    if not fields:
        return []
    with _locked(dst_prefix):
        for name in fields:
            os.replace(_field_path(src_prefix, name), _field_path(dst_prefix, name))
        _update_manifest(dst_prefix, src["num_documents"], src["idx_fingerprint"], fields)
    return sorted(fields)


def metadata_field_info(prefix: str | os.PathLike, name: str) -> dict:
    """The manifest entry of one field (dtype, description, written_by, categories, ...)."""
    fields = _read_manifest(prefix).get("fields", {})
    if name not in fields:
        raise MetadataError(f"{os.path.join(meta_dir(prefix), MANIFEST)}: no metadata field "
                            f"{name!r} (has: {sorted(fields)})")
    return dict(fields[name])


def read_metadata_field(prefix: str | os.PathLike, name: str, *, mmap: bool = False,
                        decode: bool = False) -> np.ndarray:
    """Values of field ``name`` [num_documents], checked against the dataset as it is now.

    Raises :class:`MetadataError` naming the file when the field is missing, or when the ``.idx``
    changed since the field was written (its fingerprint differs). ``mmap=True`` maps the ``.npy``
    instead of loading it; ``decode=True`` turns a categorical field's codes back into strings.
    """
    prefix = os.fspath(prefix)
    info = metadata_field_info(prefix, name)
    path = _field_path(prefix, name)
    current = idx_fingerprint(prefix)
    if info.get("idx_fingerprint") != current:
        raise MetadataError(
            f"{path}: stale metadata field {name!r}: written by {info.get('written_by')} at "
            f"{info.get('written_at')} for a different version of {prefix}.idx (fingerprint "
            f"{str(info.get('idx_fingerprint'))[:16]}..., now {current[:16]}...); the dataset was "
            "rewritten since, so recompute the field")
    if not os.path.isfile(path):
        raise MetadataError(f"{path}: listed in the manifest but missing")
    try:
        values = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise MetadataError(f"{path}: not a readable .npy ({exc})") from None
    if values.ndim != 1 or values.shape[0] != info.get("num_documents"):
        raise MetadataError(f"{path}: shape {values.shape} does not match the manifest's "
                            f"{info.get('num_documents')} documents")
    if decode:
        if "categories" not in info:
            raise MetadataError(f"{path}: field {name!r} is not categorical, nothing to decode")
        return np.asarray(info["categories"], dtype=object)[values]
    return values


def list_metadata_fields(prefix: str | os.PathLike) -> list[str]:
    """Names of the fields recorded in the manifest (stale ones included; reading those raises)."""
    return sorted(_read_manifest(prefix).get("fields", {}))


def stale_metadata_fields(prefix: str | os.PathLike) -> list[str]:
    """Fields whose recorded fingerprint no longer matches the dataset."""
    current = idx_fingerprint(prefix)
    return sorted(k for k, v in _read_manifest(prefix).get("fields", {}).items()
                  if v.get("idx_fingerprint") != current)


__all__ = [
    "MetadataError", "list_metadata_fields", "meta_dir", "metadata_field_info",
    "move_metadata_fields", "read_metadata_field", "stale_metadata_fields", "write_metadata_field",
]
