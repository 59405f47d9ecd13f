"""The run's sample index: which sample of which source is global sample ``i``, for a whole recipe.

Three guarantees Megatron-LM's blended index lacks:

1. **Exact mixture at every prefix.** Each stage is blended greedily (``csrc/blend.cpp``): for every
   prefix of ``n`` samples of a stage, each source's count is within 2 of ``weight * n``.
2. **Curriculum order survives.** A source's stream is its documents in the source's order, packed
   into samples. ``ascending:<metric>`` / ``descending:<metric>`` / ``sequential`` sources are never
   shuffled: along the run their samples follow the order, monotone within each epoch (a new epoch
   restarts the order). Only ``shuffle`` sources get per-epoch document and sample permutations.
3. **Cursors carry across stages (and intervals).** Stage ``k+1`` continues every source where
   stage ``k`` stopped, so no sample repeats until the source is exhausted; then the build fails
   (``on_exhaustion: fail``) or the source starts a new epoch (``new_epoch``).

Source streams. Epoch ``e`` of source ``s`` reads its documents in ``doc_order(s, e)`` and cuts the
concatenation into ``spe = (tokens - 1) // seq_length`` samples of ``seq_length + 1`` tokens
(overlapping by one, Megatron's GPTDataset packing; the last partial sample of an epoch is
dropped). Stream sample ``k`` is epoch ``k // spe``, epoch sample ``k % spe``, mapped through the
epoch's sample permutation for ``shuffle`` sources.

Output directory (``build_or_load_index``), all ``.npy`` with their shapes:

- ``source_id.npy``       int16 [N]      source of global sample i (ids = recipe source order)
- ``source_sample.npy``   int64 [N]      index into that source's stream (see above)
- ``stage_boundaries.npy`` int64 [T+1]   stage t holds global samples [b[t], b[t+1])
- ``cursors.npy``         int64 [T+1, S] every source's stream position at each stage boundary
- ``doc_order_<src>.npy``   int32|64 [E, D]       document ids per stored epoch
- ``sample_index_<src>.npy`` int32|64 [E, spe+1, 2] (document position, offset) of token k*seq_length
- ``sample_shuffle_<src>.npy`` int32|64 [E, spe]  epoch-sample permutation (``shuffle`` sources only)
- ``index.json``          recipe (resolved), inputs' fingerprints, code version, per-stage and
                          per-source facts, and ``fingerprint`` (sha256 of all inputs)

``E`` is 1 for ordered sources (every epoch reads the same order) and the number of epochs used
for ``shuffle`` sources. Nothing in the directory depends on time or host, so the same recipe and
data give bit-identical files.

The trainer's adaptive mixture (``megasyne.data.overlay``) extends a run interval by interval with
:func:`blend_interval` from the last cursors (``cursors.npy[-1]``): same greedy, same guarantees.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasyne import __version__ as MEGASYNE_VERSION
from megasyne.data.index_builders import (
    INDEX_ALGO_VERSION,
    BlendResult,
    build_blend,
    build_sample_index,
    num_samples_per_epoch,
    sample_index_dtype,
)
from megasyne.data.recipe import Recipe, SourceConfig, load_recipe
from megasyne.errors import DataError

logger = logging.getLogger(__name__)

INDEX_FORMAT = "megasyne-mixture-index"
INDEX_FORMAT_VERSION = 1  # bump when the directory layout or any array's meaning changes
INDEX_JSON = "index.json"
_RNG_PURPOSE = {"doc_order": 1, "sample_shuffle": 2}


class IndexBuildError(DataError, RuntimeError):
    """The recipe cannot be realised on this data (a source too small, exhausted, ...)."""


def code_version() -> dict:
    """Everything in the code that shapes the index; part of the cache fingerprint."""
    return {"index_format": INDEX_FORMAT_VERSION, "builders": INDEX_ALGO_VERSION,
            "megasyne": MEGASYNE_VERSION}


# --------------------------------------------------------------------------- sources


@dataclass(kw_only=True, frozen=True)
class SourceData:
    """One source's dataset as the index sees it (one sequence = one document)."""

    config: SourceConfig
    lengths: np.ndarray
    """int32 [D] document lengths in document (write) order (all documents of the dataset)."""
    metric: np.ndarray | None
    """[D] the order metric for ascending/descending sources, else None."""
    doc_ids: np.ndarray | None = None
    """Sorted ids of the documents the source reads when its recipe entry has ``where``."""
    num_tokens: int
    samples_per_epoch: int
    fingerprint: dict
    """{"idx": idx_fingerprint, "metric": {"name", "sha256"} | None}."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_docs(self) -> int:
        """Documents the source reads (all of the dataset's unless filtered by ``where``)."""
        return int(self.lengths.shape[0] if self.doc_ids is None else self.doc_ids.shape[0])

    @property
    def dataset_docs(self) -> int:
        return int(self.lengths.shape[0])


def _array_sha256(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    flat = a.reshape(-1)
    step = 1 << 22
    for s in range(0, flat.shape[0], step):  # chunked: a memmapped field stays out of RAM
        h.update(np.ascontiguousarray(flat[s:s + step]).tobytes())
    return h.hexdigest()


def _once(cache: dict | None, key: tuple, compute):
    """``compute()``, once per key within one ``cache`` (sources sharing a dataset: the topic
    sources of one web corpus read and hash its .idx and metadata columns once, not per topic)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def open_source(cfg: SourceConfig, seq_length: int, cache: dict | None = None) -> SourceData:
    """Open a source's dataset (and metric field) and fingerprint it."""
    from megasyne.data.indexed_dataset import IndexedDataset, idx_fingerprint

    ds = IndexedDataset(cfg.prefix)
    lengths = ds.sequence_lengths
    metric, metric_fp = None, None
    if cfg.metric is not None:
        from megasyne.data.metadata import read_metadata_field

        if ds.num_documents != len(ds):
            raise IndexBuildError(
                f"source {cfg.name!r}: {cfg.prefix}.idx has {len(ds)} sequences in "
                f"{ds.num_documents} documents; ordering by {cfg.metric!r} needs one sequence "
                "per document (preprocess without sentence splitting)")
        metric = read_metadata_field(cfg.prefix, cfg.metric, mmap=True)
        if metric.dtype.kind not in "iuf":
            raise IndexBuildError(f"source {cfg.name!r}: metric {cfg.metric!r} has dtype "
                                  f"{metric.dtype}, not numeric")
        if metric.dtype.kind == "f" and np.isnan(metric).any():
            raise IndexBuildError(f"source {cfg.name!r}: metric {cfg.metric!r} has NaN at "
                                  f"document {int(np.flatnonzero(np.isnan(metric))[0])}")
        metric_fp = {"name": cfg.metric, "sha256": _once(
            cache, ("metric_sha", cfg.prefix, cfg.metric), lambda: _array_sha256(metric))}
    doc_ids, where_fp = None, None
    if cfg.where:
        doc_ids, where_fp = _select_documents(cfg, ds, cache)
        num_tokens = int(np.asarray(lengths)[doc_ids].sum(dtype=np.int64))
    else:
        num_tokens = int(lengths.sum(dtype=np.int64))
    spe = num_samples_per_epoch(num_tokens, seq_length)
    if spe < 1:
        raise IndexBuildError(f"source {cfg.name!r} ({cfg.prefix}): {num_tokens} tokens cannot "
                              f"hold one sample of seq_length + 1 = {seq_length + 1} tokens")
    fingerprint = {"idx": _once(cache, ("idx", cfg.prefix), lambda: idx_fingerprint(cfg.prefix)),
                   "metric": metric_fp}
    if where_fp is not None:
        fingerprint["where"] = where_fp
    return SourceData(config=cfg, lengths=lengths, metric=metric, num_tokens=num_tokens,
                      samples_per_epoch=spe, fingerprint=fingerprint, doc_ids=doc_ids)


def _select_documents(cfg: SourceConfig, ds, cache: dict | None = None) -> tuple[np.ndarray, dict]:
    """Ids of the documents matching every ``where`` condition, and their fingerprint."""

    if ds.num_documents != len(ds):
        raise IndexBuildError(f"source {cfg.name!r}: 'where' needs one sequence per document "
                              f"({cfg.prefix}.idx has {len(ds)} in {ds.num_documents})")
    keep = np.ones(len(ds), dtype=bool)
    fp = {}
    for field_name, values in cfg.where:
        column, sha = _once(cache, ("where", cfg.prefix, field_name),
                            lambda f=field_name: _where_column(cfg.prefix, f))
        keep &= np.isin(column, np.asarray(values, dtype=column.dtype
                                           if column.dtype.kind != "O" else object))
        fp[field_name] = {"values": list(values), "sha256": sha}
    ids = np.flatnonzero(keep)
    if ids.size == 0:
        raise IndexBuildError(f"source {cfg.name!r}: no document of {cfg.prefix} matches "
                              f"where {dict((f, list(v)) for f, v in cfg.where)}")
    return ids.astype(sample_index_dtype(len(ds))), fp


def _where_column(prefix: str, field_name: str) -> tuple[np.ndarray, str]:
    """A ``where`` field's values (categories decoded) and their fingerprint."""
    from megasyne.data.metadata import metadata_field_info, read_metadata_field

    categorical = "categories" in metadata_field_info(prefix, field_name)
    column = read_metadata_field(prefix, field_name, decode=categorical)
    return column, _array_sha256(np.asarray(column, dtype=str) if column.dtype.kind == "O"
                                 else column)


def _rng(seed: int, name: str, epoch: int, purpose: str) -> np.random.Generator:
    # Independent of the other sources and of how many epochs exist: adding a source or an
    # epoch never changes another stream.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, zlib.crc32(name.encode()), epoch, _RNG_PURPOSE[purpose]])))


def document_order(src: SourceData, seed: int, epoch: int) -> np.ndarray:
    """Document ids of ``epoch`` in reading order [D] (int32, int64 past 2**31 documents)."""
    if src.doc_ids is not None:  # a filtered source: the same orders over its documents
        ids = src.doc_ids
        inner = SourceData(config=src.config, lengths=src.lengths[ids],
                           metric=None if src.metric is None else np.asarray(src.metric)[ids],
                           num_tokens=src.num_tokens, samples_per_epoch=src.samples_per_epoch,
                           fingerprint=src.fingerprint)
        return ids[document_order(inner, seed, epoch)].astype(sample_index_dtype(src.dataset_docs))
    d = src.num_docs
    dt = sample_index_dtype(d)
    kind = src.config.kind
    if kind == "shuffle":
        return _rng(seed, src.name, epoch, "doc_order").permutation(d).astype(dt)
    if kind == "sequential":
        return np.arange(d, dtype=dt)
    m = np.asarray(src.metric)
    if kind == "ascending":  # stable: ties keep document order
        return np.argsort(m, kind="stable").astype(dt)
    # Descending, ties still in document order: stable ascending sort of the reversed array,
    # reversed back (-m would overflow for the most negative integer).
    return (d - 1 - np.argsort(m[::-1], kind="stable"))[::-1].astype(dt)


def sample_shuffle(src: SourceData, seed: int, epoch: int) -> np.ndarray | None:
    """Permutation of the epoch's samples [spe] for ``shuffle`` sources, else None."""
    if not src.config.shuffled:
        return None
    spe = src.samples_per_epoch
    return _rng(seed, src.name, epoch, "sample_shuffle").permutation(spe).astype(
        sample_index_dtype(spe))


def stored_epochs(src: SourceData, epochs_used: int) -> int:
    """Epochs whose arrays are stored: ordered sources read one order every epoch."""
    return max(1, epochs_used) if src.config.shuffled else 1


# --------------------------------------------------------------------------- blending


def blend_interval(weights: Sequence[float] | Mapping[str, float], num_samples: int,
                   cursors, source_names: Sequence[str] | None = None) -> BlendResult:
    """Blend the next ``num_samples`` samples from cursor state ``cursors`` (int64 [S]).

    The building block of every stage and of the trainer's adaptive intervals: call it
    with the new weights and the previous result's ``cursors``; the guarantees (exact mixture at
    every prefix of the interval, no sample repeated) hold interval by interval. ``weights`` is
    [S] in source-id order, or a mapping name -> weight with ``source_names`` giving that order.
    Exhaustion is the caller's check: :func:`check_exhaustion`.
    """
    if isinstance(weights, Mapping):
        if source_names is None:
            raise ValueError("weights given by name need source_names (the source-id order)")
        unknown = set(weights) - set(source_names)
        if unknown:
            raise ValueError(f"weights: unknown sources {sorted(unknown)}")
        weights = [float(weights.get(n, 0.0)) for n in source_names]
    return build_blend(weights, num_samples, cursors)


def check_exhaustion(sources: Sequence[SourceData], before, after, *, policy: str,
                     where: str, seq_length: int) -> None:
    """Raise IndexBuildError if ``policy == "fail"`` and a source's cursor passes one epoch."""
    if policy != "fail":
        return
    for s, src in enumerate(sources):
        need, have = int(after[s]), src.samples_per_epoch
        if need > have:
            raise IndexBuildError(
                f"source {src.name!r} is exhausted in {where}: the run needs {need} of its samples "
                f"by the end of it ({need - int(before[s])} there, from stream sample "
                f"{int(before[s])}), but one epoch holds {have} ({src.num_tokens} tokens at "
                f"seq_length {seq_length}). Add data, "
                "lower its weight, or set on_exhaustion: new_epoch to repeat it")


def _epochs_used(cursor: int, spe: int) -> int:
    return -(-int(cursor) // spe)


# --------------------------------------------------------------------------- fingerprint


def open_sources(recipe: Recipe) -> list[SourceData]:
    """Every source of the recipe, in source-id order."""
    cache: dict = {}
    return [open_source(recipe.sources[n], recipe.seq_length, cache) for n in recipe.source_names]


def index_inputs(recipe: Recipe, sources: Sequence[SourceData] | None = None) -> dict:
    """Everything the index is a function of: code version, resolved recipe, data fingerprints."""
    sources = open_sources(recipe) if sources is None else sources
    return {"code_version": code_version(), "recipe": recipe.to_dict(),
            "sources": {s.name: s.fingerprint for s in sources}}


def fingerprint_of(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def what_changed(old_inputs: dict, new: dict) -> str:
    """What differs between two index inputs (:func:`index_inputs`), in words: recipe keys by
    path, sources by what changed in their data."""
    old_in = old_inputs
    changed = [] if old_in.get("code_version") == new["code_version"] else ["code_version"]
    changed += [f"recipe {path}" for path in _diff_paths(old_in.get("recipe"), new["recipe"])]
    for name, fp in new["sources"].items():
        ofp = old_in.get("sources", {}).get(name)
        if ofp is None:
            changed.append(f"source {name} (new)")
        elif ofp.get("idx") != fp["idx"]:
            changed.append(f"source {name} data (.idx/.bin)")
        elif ofp.get("where") != fp.get("where"):
            changed.append(f"source {name} document filter field (where)")
        elif ofp.get("metric") != fp["metric"]:
            changed.append(f"source {name} metric sidecar")
    return ", ".join(changed) or "index format"


def _diff_paths(old, new, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (at most a dozen)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff_paths(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out[:12]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [p for i, (a, b) in enumerate(zip(old, new))
                for p in _diff_paths(a, b, f"{path}[{i}]")][:12]
    return [] if old == new else [f"{path} ({old!r} -> {new!r})" if not isinstance(old, (dict, list))
                                  and not isinstance(new, (dict, list)) else path]


# --------------------------------------------------------------------------- build


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def build_index(recipe: Recipe, output_dir: str | os.PathLike, *,
                sources: Sequence[SourceData] | None = None) -> dict:
    """Build the index into ``output_dir`` (which must not exist yet); return its index.json.

    Prefer :func:`build_or_load_index`, which caches and publishes atomically.
    """
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True)
    names = recipe.source_names
    sources = open_sources(recipe) if sources is None else list(sources)
    inputs = index_inputs(recipe, sources)
    counts = recipe.stage_num_samples()
    total = sum(counts)
    logger.info("mixture index: %d sources, %d stages, %d samples of %d+1 tokens -> %s",
                len(names), len(counts), total, recipe.seq_length, out)

    # The blend, stage by stage, written straight into memory-mapped .npy files.
    source_id = np.lib.format.open_memmap(out / "source_id.npy", "w+", np.int16, (total,))
    source_sample = np.lib.format.open_memmap(out / "source_sample.npy", "w+", np.int64, (total,))
    cursors = np.zeros(len(names), dtype=np.int64)
    cursor_rows, boundaries, stages_meta = [cursors.copy()], [0], []
    for stage, n in zip(recipe.stages, counts):
        weights = stage.leaf_weights(names)
        start = boundaries[-1]
        res = blend_interval(weights, n, cursors)
        check_exhaustion(sources, cursors, res.cursors, policy=recipe.on_exhaustion,
                         where=f"stage {stage.name!r}", seq_length=recipe.seq_length)
        source_id[start:start + n] = res.source_id
        source_sample[start:start + n] = res.source_sample
        realised = res.cursors - cursors
        stages_meta.append({
            "name": stage.name, "start": start, "end": start + n, "num_samples": n,
            "tokens": stage.tokens, "weights": dict(zip(names, weights)),
            "realised_samples": dict(zip(names, realised.tolist())), "extra": stage.extra})
        cursors = res.cursors
        cursor_rows.append(cursors.copy())
        boundaries.append(start + n)
        logger.info("  stage %s: %d samples, %s", stage.name, n,
                    ", ".join(f"{nm}={int(c)}" for nm, c in zip(names, realised) if c))
    source_id.flush(), source_sample.flush()
    del source_id, source_sample
    _save(out / "stage_boundaries.npy", np.asarray(boundaries, dtype=np.int64))
    _save(out / "cursors.npy", np.stack(cursor_rows).astype(np.int64))

    # Per-source epoch arrays.
    sources_meta = []
    for s, src in enumerate(sources):
        spe = src.samples_per_epoch
        used = _epochs_used(cursors[s], spe)
        n_epochs = stored_epochs(src, used)
        dt = sample_index_dtype(src.dataset_docs)  # orders hold dataset document ids
        orders = np.lib.format.open_memmap(out / f"doc_order_{src.name}.npy", "w+", dt,
                                           (n_epochs, src.num_docs))
        sidx = np.lib.format.open_memmap(out / f"sample_index_{src.name}.npy", "w+", dt,
                                         (n_epochs, spe + 1, 2))
        shuf = (np.lib.format.open_memmap(out / f"sample_shuffle_{src.name}.npy", "w+",
                                          sample_index_dtype(spe), (n_epochs, spe))
                if src.config.shuffled else None)
        for e in range(n_epochs):
            order = document_order(src, recipe.seed, e)
            orders[e] = order
            sidx[e] = build_sample_index(src.lengths, recipe.seq_length, dtype=dt, order=order)
            if shuf is not None:
                shuf[e] = sample_shuffle(src, recipe.seed, e)
        for a in (orders, sidx, shuf):
            if a is not None:
                a.flush()
        del orders, sidx, shuf
        sources_meta.append({
            "name": src.name, "id": s, "prefix": src.config.prefix, "order": src.config.order,
            "num_docs": src.dataset_docs, "num_tokens": int(src.lengths.sum(dtype=np.int64)),
            "selected_docs": src.num_docs, "selected_tokens": src.num_tokens,
            "samples_per_epoch": spe,
            "samples_used": int(cursors[s]), "epochs_used": used, "stored_epochs": n_epochs,
            "fingerprint": src.fingerprint})
        logger.info("  source %s (%s): %d docs, %d samples/epoch, %d used = %.3f epochs",
                    src.name, src.config.order, src.num_docs, spe, int(cursors[s]),
                    int(cursors[s]) / spe)

    meta = {
        "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
        "fingerprint": fingerprint_of(inputs), "inputs": inputs,
        "seq_length": recipe.seq_length, "num_samples": total, "source_names": names,
        "on_exhaustion": recipe.on_exhaustion, "stages": stages_meta, "sources": sources_meta,
    }
    with open(out / INDEX_JSON, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    logger.info("mixture index built in %.1f s", time.perf_counter() - t0)
    return meta


@dataclass(kw_only=True, frozen=True)
class IndexBuild:
    """What :func:`build_or_load_index` did."""

    path: Path
    fingerprint: str
    rebuilt: bool
    reason: str
    """Why it was (re)built, or "cache hit"."""


@contextmanager
def _dir_lock(output_dir: Path):
    # Several processes (ranks, jobs) may call build_or_load_index on one directory: one builds,
    # the others wait and then find a matching cache. (flock: local and most shared filesystems.)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.parent / f".{output_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index_json(index_dir: str | os.PathLike) -> dict | None:
    try:
        with open(Path(index_dir) / INDEX_JSON, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_or_load_index(recipe: Recipe | str | os.PathLike, output_dir: str | os.PathLike, *,
                        force: bool = False, keep_stale: bool = False) -> IndexBuild:
    """Reuse ``output_dir`` if its fingerprint matches the recipe + data + code, else rebuild.

    The rebuild goes to a temporary sibling directory, renamed into place when complete, so a
    crash never leaves a half-written index that a later call would trust. With ``keep_stale``
    the index it replaces is kept as ``<output_dir>.<its fingerprint[:12]>`` (a run's record of
    what it read before its recipe or data changed), else deleted.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(output_dir).absolute()
    with _dir_lock(out):
        sources = open_sources(recipe)
        inputs = index_inputs(recipe, sources)
        fp = fingerprint_of(inputs)
        old = read_index_json(out)
        if old is not None and old.get("fingerprint") == fp and not force:
            logger.info("mixture index: reusing %s (fingerprint %s matches)", out, fp[:12])
            return IndexBuild(path=out, fingerprint=fp, rebuilt=False, reason="cache hit")
        if force:
            reason = "forced"
        elif old is None:
            reason = "no index yet" if not out.exists() else "no readable index.json"
        else:
            reason = f"stale cache, changed: {what_changed(old.get('inputs', {}), inputs)}"
        logger.info("mixture index: building %s (%s)", out, reason)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build_index(recipe, tmp, sources=sources)
            if out.exists():
                keep = out.parent / f"{out.name}.{old['fingerprint'][:12]}" \
                    if keep_stale and old is not None and old.get("fingerprint") else None
                trash = keep if keep is not None and not keep.exists() else \
                    out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(out, trash)
                os.rename(tmp, out)
                if trash != keep:
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return IndexBuild(path=out, fingerprint=fp, rebuilt=True, reason=reason)


__all__ = [
    "INDEX_FORMAT_VERSION", "IndexBuild", "IndexBuildError", "SourceData", "blend_interval",
    "build_index", "build_or_load_index", "check_exhaustion", "code_version", "document_order",
    "fingerprint_of", "index_inputs", "open_source", "open_sources", "read_index_json",
    "sample_shuffle", "what_changed",
]
