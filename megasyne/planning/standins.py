"""Stand-in datasets for a dry run: a recipe's missing sources as ``.bin``/``.idx`` pairs that
carry real document lengths and metadata but no tokens.

A dry run must build the recipe's real mixture index (every check of the real run, the real
arrays and their sizes) on a machine that holds none of the corpora. For every source prefix
that does not exist, this writes a dataset of the size the recipe reads from it:

- the ``.idx`` is a real Megatron index (one sequence per document) whose lengths are drawn from
  a log-normal distribution around ``doc_tokens`` (seeded, so the plan is reproducible), with
  enough tokens for every sample the recipe's stages take from the prefix's sources, plus 1%;
- the ``.bin`` is a sparse file of the right size (no disk blocks, no tokens): the index builder
  never reads tokens;
- the metadata sidecar holds what the recipe's sources use: a float field for ``ascending:`` /
  ``descending:`` orders, and for ``where`` filters a field whose values split the documents
  in proportion to what each filtered source needs;
- the preprocess report names a stand-in tokenizer of the model's vocabulary (the trainer's
  vocabulary check reads it).

Prefixes that exist are used as they are: a dry run over the real corpora checks them too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from megasyne.data.indexed_dataset import (
    DTYPE_CODES,
    INDEX_MAGIC,
    INDEX_VERSION,
    best_token_dtype,
    idx_path,
)
from megasyne.data.recipe import Recipe


def samples_needed(recipe: Recipe) -> dict[str, int]:
    """Samples each source gives over the whole recipe (the greedy blend stays within 2 of
    weight x samples at every prefix of a stage)."""
    need = dict.fromkeys(recipe.source_names, 0)
    for stage, n in zip(recipe.stages, recipe.stage_num_samples()):
        for name, w in stage.leaf_items():
            need[name] += math.ceil(w * n) + 2
    return need


def _write_index(prefix: str, lengths: np.ndarray, token_dtype) -> None:
    """A Megatron ``.idx`` of one sequence per document, and a sparse ``.bin`` to match."""
    itemsize = np.dtype(token_dtype).itemsize
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    tmp = idx_path(prefix) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION)
                + struct.pack("<B", DTYPE_CODES[np.dtype(token_dtype).type])
                + struct.pack("<Q", n) + struct.pack("<Q", n + 1))
        lengths.astype(np.int32).tofile(f)
        pointers.tofile(f)
        np.arange(n + 1, dtype=np.int64).tofile(f)
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * itemsize)  # sparse: no blocks written
    os.replace(tmp, idx_path(prefix))


def make_standin(prefix: str, sources: list, needs: dict[str, int], *, seq_length: int,
                 vocab_size: int, doc_tokens: int, seed: int) -> dict:
    """One stand-in dataset at ``prefix`` for the recipe ``sources`` reading it."""
    from megasyne.data.metadata import write_metadata_field

    tokens = math.ceil(sum(needs[s.name] for s in sources) * seq_length * 1.01) + seq_length
    rng = np.random.default_rng(seed)
    n_docs = max(1, math.ceil(tokens / doc_tokens))
    sigma = 1.0  # log-normal spread: a few short pages, a long tail of long ones
    lengths = rng.lognormal(math.log(doc_tokens) - sigma ** 2 / 2, sigma, n_docs)
    lengths = np.maximum(lengths, 1).astype(np.int64)
    lengths[-1] += max(0, tokens - int(lengths.sum()))       # at least what is needed
    token_dtype = best_token_dtype(vocab_size)  # what preprocessing would store
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    _write_index(prefix, lengths, token_dtype)
    metrics = {s.metric for s in sources if s.metric}
    for field in sorted(metrics):
        write_metadata_field(prefix, field, rng.random(n_docs, dtype=np.float32),
                             description="stand-in values (dry run)")
    filtered = [s for s in sources if s.where]
    for field in sorted({f for s in filtered for f, _ in s.where}):
        write_metadata_field(prefix, field, _split_values(filtered, field, needs, n_docs, rng),
                             description="stand-in values (dry run)")
    report = {"dataset": prefix, "docs": n_docs, "tokens": int(lengths.sum()), "stand_in": True,
              "tokenizer": {"path": "stand-in", "vocab_size": vocab_size, "sha256": "stand-in"}}
    Path(prefix + ".report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _split_values(filtered: list, field: str, needs: dict[str, int], n_docs: int, rng):
    """Values of ``field`` that give each filtered source a share of the documents in
    proportion to what it needs (each source takes the first value it filters on)."""
    values, weights = [], []
    for s in filtered:
        value = dict(s.where).get(field)
        if value is not None:
            values.append(value[0])
            weights.append(needs[s.name])
    p = np.asarray(weights, dtype=np.float64) / max(sum(weights), 1)
    pick = rng.choice(len(values), size=n_docs, p=p)
    if all(isinstance(v, (int, np.integer)) for v in values):
        return np.asarray(values, dtype=np.int64)[pick]
    return np.asarray([str(v) for v in values], dtype=object)[pick]


def with_standins(recipe: Recipe, out_dir: str | os.PathLike, *, vocab_size: int,
                  doc_tokens: int = 2048) -> tuple[Recipe, dict[str, dict]]:
    """The recipe with every missing source prefix replaced by a stand-in under ``out_dir``
    (made once per prefix and reused when it already exists there); returns it and the
    stand-ins made or reused, by original prefix."""
    needs = samples_needed(recipe)
    by_prefix: dict[str, list] = {}
    for s in recipe.sources.values():
        by_prefix.setdefault(s.prefix, []).append(s)
    made, sources = {}, dict(recipe.sources)
    for i, (prefix, srcs) in enumerate(sorted(by_prefix.items())):
        if os.path.isfile(idx_path(prefix)):
            continue
        # Named by everything it is made from: another recipe or model gets its own stand-in.
        what = json.dumps([prefix, vocab_size, doc_tokens, recipe.seq_length, i,
                           sorted((s.name, needs[s.name], s.order, s.where) for s in srcs)],
                          default=str)
        key = hashlib.sha256(what.encode()).hexdigest()[:12]
        standin = os.path.join(os.fspath(out_dir), f"standin_{Path(prefix).name}_{key}")
        if os.path.isfile(standin + ".report.json"):
            made[prefix] = json.loads(Path(standin + ".report.json").read_text())
        else:
            made[prefix] = make_standin(standin, srcs, needs, seq_length=recipe.seq_length,
                                        vocab_size=vocab_size, doc_tokens=doc_tokens, seed=i)
        for s in srcs:
            sources[s.name] = replace(s, prefix=standin)
    return replace(recipe, sources=sources), made
