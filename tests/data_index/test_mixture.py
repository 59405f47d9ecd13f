"""The run's index end to end: guarantees (1)-(4), exhaustion, and MixtureDataset's tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megasyne.data.dataset import MixtureDataset
from megasyne.data.indexed_dataset import IndexedDataset
from megasyne.data.metadata import read_metadata_field
from megasyne.data.mixture import IndexBuildError, blend_interval, build_or_load_index
from tests.data_index.conftest import SEQ, fits_recipe
from tests.data_index.helpers import oracle_stream, write_recipe
from tests.data_index.test_builders import max_prefix_deviation


def load(index_dir, name):
    return np.load(index_dir / name)


@pytest.mark.parametrize("which", ["fits_index", "wraps_index"])
def test_every_stage_prefix_within_two(which, request):
    """(1) each stage's mixture is exact to within 2 samples at every prefix of the stage."""
    index_dir = request.getfixturevalue(which)
    meta = json.loads((index_dir / "index.json").read_text())
    sid = load(index_dir, "source_id.npy")
    b = load(index_dir, "stage_boundaries.npy")
    assert b[0] == 0 and b[-1] == sid.shape[0] == meta["num_samples"]
    for t, st in enumerate(meta["stages"]):
        w = np.array([st["weights"][n] for n in meta["source_names"]])
        assert max_prefix_deviation(sid[b[t]:b[t + 1]], w) <= 2.0


def source_samples_in_run_order(ds: MixtureDataset, s: int) -> np.ndarray:
    return np.flatnonzero(np.asarray(ds.source_id) == s)


@pytest.mark.parametrize("which", ["fits_index", "wraps_index"])
def test_curriculum_order_survives(which, request, data_dir):
    """(2) ascending/descending sources: the metric along each source's samples is monotone
    within each epoch, over the whole run (across stages); each new epoch restarts the order.
    Sequential sources read documents in written order. Shuffled sources are shuffled."""
    ds = MixtureDataset(request.getfixturevalue(which))
    for s, name in enumerate(ds.source_names):
        order = ds.meta["sources"][s]["order"]
        globals_ = source_samples_in_run_order(ds, s)
        epochs = np.array([ds.locate(int(i))[1] for i in globals_])
        assert np.all(np.diff(epochs) >= 0)
        if order == "shuffle":
            doc_order = np.load(ds.index_dir / f"doc_order_{name}.npy")
            assert not np.array_equal(doc_order[0], np.sort(doc_order[0]))
            if doc_order.shape[0] > 1:
                assert not np.array_equal(doc_order[0], doc_order[1])  # reshuffled per epoch
            ks = np.array([ds.locate(int(i))[2] for i in globals_])
            assert np.any(np.diff(ks[epochs == 0]) < 0)  # samples are shuffled too
            continue
        metric = (read_metadata_field(str(data_dir / name), "ppl") if order != "sequential"
                  else np.arange(len(IndexedDataset(str(data_dir / name)))))
        sign = -1 if order.startswith("descending") else 1
        for e in np.unique(epochs):
            docs = np.concatenate([ds.sample_documents(int(i)) for i in globals_[epochs == e]])
            values = sign * metric[docs].astype(np.float64)
            assert np.all(np.diff(values) >= 0), (name, e)
        if epochs.max() > 0:  # the order restarts: epoch 1 begins where epoch 0 began
            first = [ds.sample_documents(int(globals_[epochs == e][0]))[0] for e in (0, 1)]
            assert first[0] == first[1]


def test_cursors_continue_and_nothing_repeats_before_exhaustion(fits_index):
    """(3) every source's stream is read 0, 1, 2, ... across stages; no token of a source is read
    twice (except the one-token overlap Megatron packing shares between consecutive samples)."""
    ds = MixtureDataset(fits_index)
    cursors = np.load(fits_index / "cursors.npy")
    b = ds.stage_boundaries
    for s, name in enumerate(ds.source_names):
        g = source_samples_in_run_order(ds, s)
        stream = np.asarray(ds.source_sample)[g]
        np.testing.assert_array_equal(stream, np.arange(g.size))
        # stage 2 starts each source exactly at stage 1's cursor
        in2 = g[g >= b[1]]
        if in2.size:
            assert ds.source_sample[in2[0]] == cursors[1][s]
        seen = set()
        lengths = ds._sources[s].dataset.sequence_lengths
        for i in g:
            _, spans = ds._spans(int(i))
            toks = [(d, o + j) for d, o, n in spans for j in range(n)][:-1]  # drop the label token
            assert not seen.intersection(toks), (name, int(i))
            seen.update(toks)
        assert len(seen) <= int(lengths.sum())


def test_exhaustion_fails_with_a_clear_message(data_dir, tmp_path):
    r = fits_recipe()
    r["stages"][1]["tokens"] = 2000 * SEQ
    path = write_recipe(data_dir / "too_much.yaml", r)  # prefixes are relative to data_dir
    with pytest.raises(IndexBuildError) as info:
        build_or_load_index(path, tmp_path / "index")
    msg = str(info.value)
    assert "stage 'synthetic'" in msg and "exhausted" in msg and "on_exhaustion: new_epoch" in msg
    assert "source 'code'" in msg or "source 'web_zh'" in msg or "source 'web_en'" in msg
    assert not (tmp_path / "index").exists()  # nothing half-built left behind
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_new_epoch_opens_more_epochs(wraps_index):
    ds = MixtureDataset(wraps_index)
    by = {m["name"]: m for m in ds.meta["sources"]}
    assert by["code"]["epochs_used"] >= 2 and by["code"]["stored_epochs"] == 1  # ordered: one
    assert by["book"]["epochs_used"] >= 2
    assert by["book"]["stored_epochs"] == by["book"]["epochs_used"]  # shuffled: one per epoch
    for m in ds.meta["sources"]:
        assert m["samples_used"] <= m["epochs_used"] * m["samples_per_epoch"]


def expected_tokens(ds: MixtureDataset, i: int, data_dir, cache: dict) -> np.ndarray:
    """Oracle: concatenate the source's documents in the epoch's order, slice sample k."""
    s, epoch, k, slot = ds.locate(i)
    name = ds.source_names[s]
    order = ds.meta["sources"][s]["order"]
    key = (name, slot)
    if key not in cache:
        prefix = str(data_dir / name)
        if order == "shuffle":
            doc_order = np.load(ds.index_dir / f"doc_order_{name}.npy")[slot]
            assert np.array_equal(np.sort(doc_order), np.arange(doc_order.size))
        elif order == "sequential":
            doc_order = np.arange(len(IndexedDataset(prefix)))
        else:  # independent of the index: stable sort of the sidecar
            m = read_metadata_field(prefix, "ppl").astype(np.float64)
            doc_order = np.argsort(-m if order.startswith("desc") else m, kind="stable")
        cache[key] = oracle_stream(prefix, doc_order)
    if order == "shuffle":
        perm = np.load(ds.index_dir / f"sample_shuffle_{name}.npy")[slot]
        assert k in perm
    return cache[key][k * SEQ:k * SEQ + SEQ + 1]


@pytest.mark.parametrize("which", ["fits_index", "wraps_index"])
def test_getitem_returns_exactly_the_right_tokens(which, request, data_dir):
    ds = MixtureDataset(request.getfixturevalue(which))
    cache: dict = {}
    for i in range(len(ds)):
        item = ds[i]
        assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (SEQ + 1,)
        assert type(item["tokens"]) is np.ndarray and isinstance(item["source"], int)
        assert item["source"] == int(ds.source_id[i])
        np.testing.assert_array_equal(item["tokens"], expected_tokens(ds, i, data_dir, cache))


def test_restart_at_any_sample_reads_the_same(wraps_index):
    ds = MixtureDataset(wraps_index)
    straight = [ds[i]["tokens"] for i in range(len(ds))]
    rng = np.random.default_rng(0)
    for start in [0, 1, len(ds) - 1, *rng.integers(0, len(ds), 5).tolist()]:
        resumed = MixtureDataset(wraps_index)  # a fresh process would open it like this
        for i in range(start, min(start + 40, len(ds))):
            np.testing.assert_array_equal(resumed[i]["tokens"], straight[i])


def test_pickles_as_its_directory(fits_index):
    import pickle

    ds = MixtureDataset(fits_index)
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # not the memory maps' contents
    again = pickle.loads(blob)
    for i in (0, 5, len(ds) - 1):
        np.testing.assert_array_equal(again[i]["tokens"], ds[i]["tokens"])


def test_stage_of_and_bounds(fits_index):
    ds = MixtureDataset(fits_index)
    b = ds.stage_boundaries
    assert ds.stage_names == ["bilingual", "synthetic"]
    assert ds.stage_of(0) == 0 and ds.stage_of(int(b[1]) - 1) == 0 and ds.stage_of(int(b[1])) == 1
    assert ds.stage_of(len(ds) - 1) == 1
    assert ds.stage_extra[0] == {"lr": 1.0e-5}
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[-1]


def test_blend_interval_extends_from_the_last_cursors(fits_index):
    """The adaptive mixture extends the run interval by interval from cursors.npy[-1]."""
    ds = MixtureDataset(fits_index)
    last = np.load(fits_index / "cursors.npy")[-1]
    nxt = blend_interval({"web_en": 0.5, "book": 0.5}, 50, last, source_names=ds.source_names)
    for s in range(len(ds.source_names)):
        got = nxt.source_sample[nxt.source_id == s]
        np.testing.assert_array_equal(got, last[s] + np.arange(got.size))
    assert set(nxt.source_id.tolist()) == {0, 2}
    with pytest.raises(ValueError, match="unknown sources"):
        blend_interval({"nope": 1.0}, 5, last, source_names=ds.source_names)
