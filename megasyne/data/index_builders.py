"""Thin, checked Python faces of the C++ index builders in ``csrc/`` (``megasyne._csrc``).

The C++ functions trust their inputs (unchecked numpy views); these wrappers check shapes,
dtypes and bounds first and raise ``ValueError`` naming the argument. The extension is compiled
by ``pip install -e .`` (setup.py), never at import: a missing build is an ImportError that says
how to build it, on every rank at once, instead of rank 0 compiling while the others hang.

- :func:`build_blend`: exact greedy blend of S sources into N samples, continuing cursors.
- :func:`build_sample_index`: Megatron GPTDataset-style packed sample boundaries of one epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from megasyne import _csrc
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "megasyne._csrc (the C++ sample-index builders in csrc/) is not built. Build it with "
        "`pip install -e . --no-build-isolation` (or `python setup.py build_ext --inplace`) "
        f"from the repository root; it is never compiled at import time. ({exc})"
    ) from exc

INDEX_ALGO_VERSION: str = _csrc.INDEX_ALGO_VERSION
MAX_SOURCES = 32767  # source ids are int16, as Megatron's dataset_index
INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(kw_only=True, frozen=True)
class BlendResult:
    """One blended interval."""

    source_id: np.ndarray
    """int16 [N]: the source of each sample of the interval."""
    source_sample: np.ndarray
    """int64 [N]: index into that source's own sample stream (= its cursor + running count)."""
    cursors: np.ndarray
    """int64 [S]: each source's cursor after the interval (input to the next interval)."""


def normalise_weights(weights, *, name: str = "weights") -> np.ndarray:
    """float64 [S] weights -> float64 [S] summing to 1; finite, >= 0, not all zero."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {w.shape}")
    if w.shape[0] > MAX_SOURCES:
        raise ValueError(f"{name}: {w.shape[0]} sources, at most {MAX_SOURCES} (int16 source ids)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name}: weights must be finite and >= 0, got {w.tolist()[:16]}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"{name}: weights sum to 0; at least one source needs a weight > 0")
    return w / total


def build_blend(weights, num_samples: int, cursors=None) -> BlendResult:
    """Blend ``num_samples`` samples over ``S`` sources, continuing per-source ``cursors``.

    Sample ``i`` goes to the source with the largest ``w_s * (i + 1) - count_s`` (ties to the
    lowest id), ``count_s`` counting this interval only; so for every prefix ``n`` of the interval
    ``|count_s(n) - w_s * n| <= 2`` (in practice < 1.25). Weights are normalised to sum to 1.
    A source with weight 0 is never chosen. ``cursors`` (int64 [S], default zeros) is where each
    source's stream stands; the result's ``cursors`` is where the next interval starts.
    """
    w = normalise_weights(weights)
    num_sources = w.shape[0]
    if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples, (int, np.integer)):
        raise ValueError(f"num_samples: expected an int, got {type(num_samples).__name__}")
    if num_samples < 0:
        raise ValueError(f"num_samples: must be >= 0, got {num_samples}")
    if cursors is None:
        cur = np.zeros(num_sources, dtype=np.int64)
    else:
        cur = np.asarray(cursors)
        if cur.dtype.kind not in "iu":
            raise ValueError(f"cursors: expected integers, got dtype {cur.dtype}")
        cur = np.ascontiguousarray(cur, dtype=np.int64)
        if cur.shape != (num_sources,):
            raise ValueError(f"cursors: expected shape ({num_sources},), got {cur.shape}")
        if np.any(cur < 0):
            raise ValueError(f"cursors: must be >= 0, got {cur.tolist()}")
        if int(cur.max()) > np.iinfo(np.int64).max - int(num_samples):
            raise ValueError("cursors: would overflow int64 after this interval")
    source_id, source_sample, cursors_out = _csrc.build_blend(
        np.ascontiguousarray(w), int(num_samples), cur)
    return BlendResult(source_id=source_id, source_sample=source_sample, cursors=cursors_out)


def sample_index_dtype(num_docs: int) -> np.dtype:
    """int32 when every (document position, offset) fits, else int64 (offsets are < 2**31)."""
    return np.dtype(np.int32) if num_docs <= INT32_MAX else np.dtype(np.int64)


def num_samples_per_epoch(num_tokens: int, seq_length: int) -> int:
    """Samples of ``seq_length + 1`` tokens, overlapping by one, that ``num_tokens`` hold."""
    return max(0, (int(num_tokens) - 1) // int(seq_length))


def build_sample_index(lengths, seq_length: int, dtype=None, *, order=None) -> np.ndarray:
    """Packed sample index of one epoch: ``[num_samples + 1, 2]`` (document position, offset).

    ``lengths``: int32 [D], the source's document lengths in this epoch's reading order; or, with
    ``order`` (integer [D] document ids, the epoch's reading order), the lengths in document-id
    order, read as ``lengths[order[p]]`` without a gathered copy. Row ``k`` locates token
    ``k * seq_length`` of the epoch's concatenated stream; sample ``k`` is the ``seq_length + 1``
    tokens from row ``k`` up to and including row ``k + 1`` (``num_samples = (tokens - 1) //
    seq_length``). Identical to Megatron's ``build_sample_idx`` for one epoch with
    ``add_extra_token_to_sequence``. ``dtype``: np.int32 / np.int64, default
    :func:`sample_index_dtype` of the number of documents.
    """
    lens = np.asarray(lengths)
    if lens.ndim != 1:
        raise ValueError(f"lengths: expected a 1-D array, got shape {lens.shape}")
    if lens.dtype.kind not in "iu":
        raise ValueError(f"lengths: expected integer document lengths, got dtype {lens.dtype}")
    if lens.dtype != np.int32:
        if lens.size and (int(lens.max()) > INT32_MAX):
            raise ValueError("lengths: a document is longer than 2**31 - 1 tokens")
        lens = lens.astype(np.int32)
    lens = np.ascontiguousarray(lens)
    if isinstance(seq_length, (bool, np.bool_)) or not isinstance(seq_length, (int, np.integer)) \
            or seq_length < 1:
        raise ValueError(f"seq_length: expected an int >= 1, got {seq_length!r}")
    num_docs = lens.shape[0] if order is None else np.shape(order)[0] if np.ndim(order) else -1
    dt = sample_index_dtype(max(num_docs, 0)) if dtype is None else np.dtype(dtype)
    if dt not in (np.int32, np.int64):
        raise ValueError(f"dtype: expected int32 or int64, got {dt}")
    if dt == np.int32 and num_docs > INT32_MAX:
        raise ValueError(f"dtype: int32 cannot address {num_docs} documents; use int64")
    # Negative lengths, document ids out of range and too few tokens are checked by the C++
    # loop as it reads each value (ValueError naming the position): a pass here for each would
    # cost more than the loop's own checks (the arrays hold up to ~10^8 entries).
    if order is not None:
        o = np.asarray(order)
        if o.ndim != 1 or o.dtype.kind not in "iu":
            raise ValueError(f"order: expected a 1-D integer array, got {o.dtype} {o.shape}")
        if o.dtype != dt and o.size and (int(o.min()) < 0 or int(o.max()) >= lens.shape[0]):
            # Here only: casting to dt could wrap an out-of-range id into range.
            raise ValueError(f"order: document ids must be in [0, {lens.shape[0]})")
        order = np.ascontiguousarray(o, dtype=dt)
    if order is None:
        fn = _csrc.build_sample_index_int32 if dt == np.int32 else _csrc.build_sample_index_int64
        return fn(lens, int(seq_length))
    fn = (_csrc.build_sample_index_ordered_int32 if dt == np.int32
          else _csrc.build_sample_index_ordered_int64)
    return fn(lens, order, int(seq_length))


__all__ = [
    "BlendResult", "INDEX_ALGO_VERSION", "MAX_SOURCES", "build_blend", "build_sample_index",
    "normalise_weights", "num_samples_per_epoch", "sample_index_dtype",
]
