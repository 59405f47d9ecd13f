"""Re-blended intervals over a built mixture index: how the adaptive topic mixture changes
what the trainer reads from a given step on, with the static index's guarantees.

The static index fixes, for every global sample, its source and its position in that source's
sample stream. When the trainer changes the topic ratios at step ``t``, the samples from
``t * G`` on are blended again (``megasyne.data.mixture.blend_interval``, the same C++ greedy)
from the cursors every source has reached at that sample, with the stage's weights where the
topics' share is split by the new ratios. So, per interval: exact ratios at every prefix,
ordered sources keep their order, cursors continue (nothing repeated, nothing skipped), and
the interval is a pure function of (index, decisions), so a resumed run re-derives it.

Each interval is stored as ``<run_dir>/adaptive/interval_<first sample>.npz`` (source_id,
source_sample, cursors after it), written atomically by one rank; every rank applies the same
intervals to its in-memory copy of the two per-sample arrays (10 bytes per sample: 120 MB for
the SynE run's 12M samples).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megasyne.atomic import atomic_write
from megasyne.data.dataset import MixtureDataset
from megasyne.data.mixture import blend_interval
from megasyne.errors import DataError


class OverlayError(DataError, RuntimeError):
    """An interval cannot be re-blended on this index (e.g. a source would run out)."""


def stream_cursors(source_id: np.ndarray, num_sources: int, sample: int, *, since: int = 0,
                   base: np.ndarray | None = None) -> np.ndarray:
    """Every source's stream position before global sample ``sample`` (int64 [S]).

    Every stream starts at 0 at sample 0 and every sample takes the next sample of its source's
    stream, in the static index and in every re-blended interval alike, so the position is the
    number of the source's samples before ``sample``. After a rebase at ``since`` (where the
    positions were ``base``), only the samples from ``since`` on are counted on top of ``base``.
    """
    counts = np.bincount(np.asarray(source_id[since:sample], dtype=np.int64),
                         minlength=num_sources)
    return counts if base is None else np.asarray(base, dtype=np.int64) + counts


class MixtureOverlay:
    """A MixtureDataset whose samples from some point on follow re-blended intervals."""

    def __init__(self, dataset: MixtureDataset, directory: str | os.PathLike | None):
        self.dataset = dataset
        self.directory = Path(directory) if directory is not None else None
        self._base_id = dataset.source_id
        self._base_sample = dataset.source_sample
        # Writable copies the trainer reads through (MixtureDataset.locate uses these names).
        dataset.source_id = np.array(dataset.source_id)
        dataset.source_sample = np.array(dataset.source_sample)
        self.applied: list[tuple[int, int]] = []   # (first, end) of each applied interval
        self._cursor_after: np.ndarray | None = None
        self._meta = {s["name"]: s for s in dataset.meta["sources"]}

    # ------------------------------------------------------------------ cursors

    def cursors_at(self, sample: int) -> np.ndarray:
        """Every source's cursor (samples taken from it) before global sample ``sample``."""
        ds = self.dataset
        if self.applied and sample == self.applied[-1][1]:
            return self._cursor_after.copy()
        if self.applied and sample < self.applied[-1][1]:
            raise OverlayError(f"cursors before sample {sample} lie inside re-blended intervals")
        # Inside the static index: the stage's starting cursors plus what the stage took so far.
        k = int(np.searchsorted(ds.stage_boundaries, sample, side="right")) - 1
        k = min(k, len(ds.stage_names) - 1)
        start = int(ds.stage_boundaries[k])
        cursors = np.asarray(ds.cursors[k], dtype=np.int64).copy()
        counts = np.bincount(np.asarray(ds.source_id[start:sample], dtype=np.int64),
                             minlength=len(ds.source_names))
        return cursors + counts

    # ------------------------------------------------------------------ blending

    def stage_weights(self, k: int) -> dict[str, float]:
        return dict(self.dataset.meta["stages"][k]["weights"])

    def reblend(self, first: int, end: int, weights_of_stage, *,
                cursors: np.ndarray | None = None) -> dict:
        """Blend samples [first, end) again; ``weights_of_stage(k)`` -> {source: weight}.

        Pieces never cross a stage boundary: each uses its own stage's (adjusted) weights.
        Every source starts at its cursor before ``first`` (or at ``cursors``: a rebase onto
        this index of positions reached under another one).
        Returns the interval's arrays (also applied in memory; call :meth:`save` to persist).
        """
        ds = self.dataset
        end = min(end, len(ds))
        if first >= end:
            return {}
        if self.applied and first != self.applied[-1][1]:
            raise OverlayError(f"intervals must be contiguous: next starts at "
                               f"{self.applied[-1][1]}, got {first}")
        cursors = self.cursors_at(first) if cursors is None else np.asarray(cursors, np.int64)
        ids, samples = [], []
        at = first
        while at < end:
            k = int(np.searchsorted(ds.stage_boundaries, at, side="right")) - 1
            piece_end = min(end, int(ds.stage_boundaries[k + 1]))
            w = weights_of_stage(k)
            res = blend_interval([float(w.get(n, 0.0)) for n in ds.source_names],
                                 piece_end - at, cursors)
            self._check_capacity(res.cursors)
            ids.append(res.source_id)
            samples.append(res.source_sample)
            cursors = res.cursors
            at = piece_end
        arrays = dict(first=np.int64(first), source_id=np.concatenate(ids),
                      source_sample=np.concatenate(samples), cursors=cursors)
        self.apply(arrays)
        return arrays

    def _check_capacity(self, cursors: np.ndarray) -> None:
        on_exhaustion = self.dataset.meta.get("on_exhaustion", "fail")
        for name, c in zip(self.dataset.source_names, cursors):
            m = self._meta[name]
            spe, stored = int(m["samples_per_epoch"]), int(m["stored_epochs"])
            if m["order"] == "shuffle" and int(c) > spe * stored:
                raise OverlayError(
                    f"re-blending needs {int(c)} samples of source {name!r}, but the index stores "
                    f"{stored} shuffled epoch(s) of {spe}; give that source more data or a "
                    f"lower upper bound")
            if on_exhaustion == "fail" and int(c) > spe:
                raise OverlayError(f"source {name!r} is exhausted by the re-blended mixture "
                                   f"({int(c)} of {spe} samples); the recipe says on_exhaustion: fail")

    def apply(self, arrays: dict) -> None:
        first = int(arrays["first"])
        n = int(arrays["source_id"].shape[0])
        self.dataset.source_id[first:first + n] = arrays["source_id"]
        self.dataset.source_sample[first:first + n] = arrays["source_sample"]
        self.applied.append((first, first + n))
        self._cursor_after = np.asarray(arrays["cursors"], dtype=np.int64)

    # ------------------------------------------------------------------ files

    def path(self, first: int) -> Path:
        return self.directory / f"interval_{first:012d}.npz"

    def save(self, arrays: dict) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.path(int(arrays["first"])), lambda f: np.savez(f, **arrays))

    def load_through(self, sample: int) -> int:
        """Apply the stored intervals that start at or before ``sample`` (the last one decided
        before the checkpoint being resumed); returns how many. Later ones (written after that
        checkpoint, before a crash) are ignored: they will be decided again, identically."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        n = 0
        for path in sorted(self.directory.glob("interval_*.npz")):
            first = int(path.stem.split("_")[1])
            if first <= sample:
                with np.load(path) as z:
                    self.apply({k: z[k] for k in z.files})
                n += 1
        return n
