"""``MixtureDataset``: global sample ``i`` of a built mixture index, in O(1), as a pure function of i.

The trainer reads ``dataset[i]`` for consecutive ``i`` (``megasyne.training.batches``); a resumed run
starts at ``i = consumed_samples`` and gets exactly what the uninterrupted run would have read,
because nothing here has state: every array is a read-only memory map of the index directory
written by :func:`megasyne.data.mixture.build_or_load_index`, and every source dataset a
read-only memory map of its ``.bin``.

    ds = MixtureDataset(index_dir)
    item = ds[i]    # {"tokens": int64 [seq_length + 1], "source": int (id into ds.source_names)}
    ds.stage_of(i)  # stage number of sample i (ds.stage_names[...] for its name)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasyne.data.mixture import INDEX_FORMAT, INDEX_FORMAT_VERSION, read_index_json
from megasyne.errors import DataError


class IndexMismatchError(DataError, RuntimeError):
    """The index directory is unreadable or no longer matches its source datasets."""


@dataclass(kw_only=True, frozen=True)
class _Source:
    name: str
    dataset: object  # megasyne.data.indexed_dataset.IndexedDataset
    samples_per_epoch: int
    stored_epochs: int
    shuffled: bool
    doc_order: np.ndarray  # [E, D]
    sample_index: np.ndarray  # [E, spe + 1, 2]
    sample_shuffle: np.ndarray | None  # [E, spe]


class MixtureDataset:
    """Read-only view of a mixture index directory (see megasyne.data.mixture for its layout).

    ``verify`` checks, on open, that every source dataset is still the one the index was built
    from, so swapped data fails loudly instead of feeding tokens the index never described:
    ``"fast"`` (default, also ``True``) compares document and token counts and the ``.bin`` size
    (O(documents) of int32 reads, no hashing: cheap on every rank); ``"full"`` recomputes the
    ``.idx`` fingerprint (sha256 of the ``.idx``; :func:`build_or_load_index` already does this
    on the building rank); ``False`` skips it.

    Picklable (e.g. to DataLoader workers): it pickles as its directory and reopens there.
    """

    def __init__(self, index_dir: str | os.PathLike, *, verify: bool | str = "fast") -> None:
        from megasyne.data.indexed_dataset import IndexedDataset, idx_fingerprint

        if verify not in (True, False, "fast", "full"):
            raise ValueError(f"verify must be 'fast', 'full', True or False, got {verify!r}")
        self.index_dir = Path(index_dir)
        self._verify = verify
        meta = read_index_json(self.index_dir)
        if meta is None:
            raise IndexMismatchError(f"{self.index_dir}: no readable index.json; build the index "
                                     "with megasyne.data.mixture.build_or_load_index")
        if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexMismatchError(
                f"{self.index_dir}: index format {meta.get('format')} v{meta.get('format_version')}"
                f", this code reads {INDEX_FORMAT} v{INDEX_FORMAT_VERSION}; rebuild it")
        self.meta = meta
        self.fingerprint: str = meta["fingerprint"]
        self.seq_length: int = int(meta["seq_length"])
        self.source_names: list[str] = list(meta["source_names"])
        self.stage_names: list[str] = [s["name"] for s in meta["stages"]]
        self.stage_extra: list[dict] = [s.get("extra", {}) for s in meta["stages"]]

        def load(name: str) -> np.ndarray:
            return np.load(self.index_dir / name, mmap_mode="r", allow_pickle=False)

        self.source_id = load("source_id.npy")  # int16 [N]
        self.source_sample = load("source_sample.npy")  # int64 [N]
        self.stage_boundaries = np.asarray(load("stage_boundaries.npy"))  # int64 [T+1]
        self.cursors = np.asarray(load("cursors.npy"))  # int64 [T+1, S]
        if self.source_id.shape != (int(meta["num_samples"]),) or \
                self.source_sample.shape != self.source_id.shape:
            raise IndexMismatchError(f"{self.index_dir}: source_id/source_sample shapes "
                                     f"{self.source_id.shape}/{self.source_sample.shape} do not "
                                     f"match num_samples {meta['num_samples']}")
        self._sources: list[_Source] = []
        for sm in meta["sources"]:
            name = sm["name"]
            dataset = IndexedDataset(sm["prefix"])
            if verify == "full":
                changed = idx_fingerprint(sm["prefix"]) != sm["fingerprint"]["idx"]
            elif verify:  # the fingerprint is "<sha256 of .idx>-<.bin size>"
                changed = (len(dataset) != sm["num_docs"] or dataset.num_tokens != sm["num_tokens"]
                           or not sm["fingerprint"]["idx"].endswith(
                               f"-{os.path.getsize(dataset.bin_file)}"))
            else:
                changed = False
            if changed:
                raise IndexMismatchError(
                    f"{self.index_dir}: source {name!r} ({sm['prefix']}) changed since the index "
                    "was built; rebuild the index with build_or_load_index")
            shuffled = sm["order"] == "shuffle"
            self._sources.append(_Source(
                name=name, dataset=dataset,
                samples_per_epoch=int(sm["samples_per_epoch"]),
                stored_epochs=int(sm["stored_epochs"]), shuffled=shuffled,
                doc_order=load(f"doc_order_{name}.npy"),
                sample_index=load(f"sample_index_{name}.npy"),
                sample_shuffle=load(f"sample_shuffle_{name}.npy") if shuffled else None))

    def __len__(self) -> int:
        return int(self.source_id.shape[0])

    def __reduce__(self):
        # Memory maps would pickle as full copies: reopen from the directory instead.
        return (_reopen, (str(self.index_dir), self._verify))

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    def stage_of(self, i: int) -> int:
        """Stage number (index into ``stage_names``) that global sample ``i`` belongs to."""
        i = self._check(i)
        return int(np.searchsorted(self.stage_boundaries, i, side="right")) - 1

    def _check(self, i) -> int:
        n = len(self)
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range [0, {n})")
        return int(i)

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(source id, epoch, epoch sample, stored-epoch slot) of global sample ``i``."""
        i = self._check(i)
        s = int(self.source_id[i])
        src = self._sources[s]
        epoch, k = divmod(int(self.source_sample[i]), src.samples_per_epoch)
        slot = epoch if src.shuffled else 0  # ordered sources read one order every epoch
        if slot >= src.stored_epochs:
            raise IndexMismatchError(f"{self.index_dir}: sample {i} needs epoch {epoch} of "
                                     f"{src.name!r}, only {src.stored_epochs} stored")
        if src.sample_shuffle is not None:
            k = int(src.sample_shuffle[slot, k])
        return s, epoch, k, slot

    def _spans(self, i: int) -> tuple[int, list[tuple[int, int, int]]]:
        """Source id and the (document id, offset, length) pieces that make up sample ``i``."""
        s, _, k, slot = self.locate(i)
        src = self._sources[s]
        (p0, o0), (p1, o1) = src.sample_index[slot, k], src.sample_index[slot, k + 1]
        p0, o0, p1, o1 = int(p0), int(o0), int(p1), int(o1)
        order = src.doc_order[slot]
        lengths = src.dataset.sequence_lengths
        if p0 == p1:
            return s, [(int(order[p0]), o0, o1 - o0 + 1)]
        d0 = int(order[p0])
        spans = [(d0, o0, int(lengths[d0]) - o0)]
        for p in range(p0 + 1, p1):
            d = int(order[p])
            spans.append((d, 0, int(lengths[d])))
        spans.append((int(order[p1]), 0, o1 + 1))  # the end row's token is the extra label token
        return s, spans

    def sample_documents(self, i: int) -> np.ndarray:
        """Document ids (in the source's dataset) that sample ``i`` reads, in reading order."""
        _, spans = self._spans(i)
        return np.asarray([d for d, _, n in spans if n > 0], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        s, spans = self._spans(i)
        ds = self._sources[s].dataset
        parts = [ds.get(d, offset=o, length=n) for d, o, n in spans if n > 0]
        # np.array (not astype): a plain int64 ndarray, never a view of the .bin memmap.
        tokens = np.array(np.concatenate(parts) if len(parts) > 1 else parts[0], dtype=np.int64)
        if tokens.shape[0] != self.seq_length + 1:  # a corrupt index, never a normal outcome
            raise IndexMismatchError(f"{self.index_dir}: sample {i} has {tokens.shape[0]} tokens, "
                                     f"expected seq_length + 1 = {self.seq_length + 1}")
        return {"tokens": tokens, "source": s}

    def __repr__(self) -> str:
        return (f"MixtureDataset({str(self.index_dir)!r}, samples={len(self)}, "
                f"seq_length={self.seq_length}, sources={self.source_names}, "
                f"stages={self.stage_names})")


def _reopen(index_dir: str, verify) -> MixtureDataset:
    return MixtureDataset(index_dir, verify=verify)


__all__ = ["IndexMismatchError", "MixtureDataset"]
