"""Shared helpers of the mixture-index tests: tiny datasets, recipes and brute-force oracles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("TRITON_INTERPRET", "1")


def make_source(directory: Path, name: str, *, n_docs: int, seed: int, min_len: int = 1,
                max_len: int = 60, metric: str | None = "ppl", dtype=np.uint16) -> str:
    """Write ``<directory>/<name>`` (.bin/.idx) of random docs and a random ``metric`` sidecar.

    Tokens are random in [0, 60000); the metric has deliberate ties (rounded values).
    """
    from megasyne.data.indexed_dataset import IndexedDatasetWriter
    from megasyne.data.metadata import write_metadata_field

    rng = np.random.default_rng(seed)
    prefix = str(directory / name)
    lengths = rng.integers(min_len, max_len + 1, n_docs)
    with IndexedDatasetWriter(prefix, dtype) as w:
        for n in lengths:
            w.add_document(rng.integers(0, 60000, n).astype(dtype))
    if metric:
        values = np.round(rng.gamma(2.0, 5.0, n_docs), 1).astype(np.float32)
        write_metadata_field(prefix, metric, values, description="test perplexity")
    return prefix


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def oracle_stream(prefix: str, doc_order: np.ndarray) -> np.ndarray:
    """Concatenated tokens of the source's documents in ``doc_order`` (int64)."""
    from megasyne.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.concatenate([ds.get(int(d)) for d in doc_order]).astype(np.int64)


def oracle_sample_index(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Brute force: (document position, offset) of token k * seq_length, k = 0..num_samples."""
    ends = np.cumsum(lengths.astype(np.int64))
    total = int(ends[-1])
    num_samples = (total - 1) // seq_length
    tok = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, tok, side="right")  # first document whose end is past the token
    start = ends[pos] - lengths[pos]
    return np.stack([pos, tok - start], axis=1)


FIXED_BITS = 52


def fixed_point_weights(weights) -> list[int]:
    """The blend's exact weights: round-half-even(w * 2^52), the largest nudged to sum to 2^52."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    q = [int(x) for x in np.rint(np.ldexp(w, FIXED_BITS))]
    largest = max(range(len(q)), key=lambda s: (q[s], -s))  # lowest id among equals
    q[largest] += (1 << FIXED_BITS) - sum(q)
    return q


def oracle_blend(weights, num_samples: int, cursors: np.ndarray, megatron_rule: bool = False):
    """Brute-force greedy, ties to the lowest id.

    megasyne: argmax of W_s * (i + 1) - count_s * 2^52, exact Python integers.
    Megatron (``megatron_rule``): argmax of w_s * max(i, 1) - count_s in float64, as its C++.
    """
    n_src = len(weights)
    count = [0] * n_src
    sid = np.empty(num_samples, dtype=np.int16)
    ssm = np.empty(num_samples, dtype=np.int64)
    if megatron_rule:
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
    else:
        q = fixed_point_weights(weights)
    for i in range(num_samples):
        if megatron_rule:
            err = w * float(max(i, 1)) - np.asarray(count, dtype=np.float64)
            s = int(np.argmax(err))  # first maximum = lowest id
        else:
            err = [q[k] * (i + 1) - (count[k] << FIXED_BITS) for k in range(n_src)]
            s = err.index(max(err))
        sid[i] = s
        ssm[i] = int(cursors[s]) + count[s]
        count[s] += 1
    return sid, ssm, np.asarray(cursors, dtype=np.int64) + np.asarray(count, dtype=np.int64)
