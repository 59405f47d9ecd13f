"""The per-document metadata sidecar: round trip, validation, categorical fields, stale detection."""

import json
import os

import numpy as np
import pytest

from megasyne.data.indexed_dataset import IndexedDatasetWriter, idx_fingerprint
from megasyne.data.metadata import (
    MetadataError,
    list_metadata_fields,
    meta_dir,
    metadata_field_info,
    read_metadata_field,
    stale_metadata_fields,
    write_metadata_field,
)


def make_dataset(prefix, n=10, shift=0):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for i in range(n):
            w.add_document(np.arange(1, 2 + (i + shift) % 5))
    return str(prefix)


def test_round_trip_and_manifest(tmp_path):
    ds = make_dataset(tmp_path / "d")
    ppl = np.linspace(1, 9, 10, dtype=np.float32)
    path = write_metadata_field(ds, "ppl", ppl, description="model perplexity")
    assert path == os.path.join(meta_dir(ds), "ppl.npy")
    write_metadata_field(ds, "topic", np.arange(10, dtype=np.int16) % 3, written_by="classifier v1")
    got = read_metadata_field(ds, "ppl")
    assert got.dtype == np.float32 and np.array_equal(got, ppl)
    assert read_metadata_field(ds, "topic", mmap=True).dtype == np.int16
    assert list_metadata_fields(ds) == ["ppl", "topic"]
    manifest = json.loads((tmp_path / "d.meta" / "manifest.json").read_text())
    assert manifest["num_documents"] == 10 and manifest["idx_fingerprint"] == idx_fingerprint(ds)
    info = metadata_field_info(ds, "ppl")
    assert info["dtype"] == "float32" and info["description"] == "model perplexity"
    assert metadata_field_info(ds, "topic")["written_by"] == "classifier v1"
    assert not [f for f in os.listdir(tmp_path / "d.meta") if ".tmp." in f]


def test_categorical_strings(tmp_path):
    ds = make_dataset(tmp_path / "d", n=4)
    write_metadata_field(ds, "lang", ["en", "zh", "en", "zh"])
    assert metadata_field_info(ds, "lang")["categories"] == ["en", "zh"]
    assert read_metadata_field(ds, "lang").tolist() == [0, 1, 0, 1]
    assert read_metadata_field(ds, "lang", decode=True).tolist() == ["en", "zh", "en", "zh"]
    write_metadata_field(ds, "src", [2, 0, 1, 1], categories=["web", "book", "code"])
    assert read_metadata_field(ds, "src", decode=True).tolist() == ["code", "web", "book", "book"]
    with pytest.raises(MetadataError, match="not one of the categories"):
        write_metadata_field(ds, "lang2", ["en", "fr", "en", "en"], categories=["en", "zh"])
    with pytest.raises(MetadataError, match="codes outside"):
        write_metadata_field(ds, "src", [3, 0, 0, 0], categories=["web", "book", "code"])
    write_metadata_field(ds, "n", [1, 2, 3, 4])
    with pytest.raises(MetadataError, match="not categorical"):
        read_metadata_field(ds, "n", decode=True)


def test_validation(tmp_path):
    ds = make_dataset(tmp_path / "d", n=3)
    with pytest.raises(MetadataError, match=r"2 values but .*d\.idx has 3 documents"):
        write_metadata_field(ds, "ppl", [1.0, 2.0])
    with pytest.raises(MetadataError, match="NaN at document 1"):
        write_metadata_field(ds, "ppl", [1.0, float("nan"), 2.0])
    write_metadata_field(ds, "ppl", [1.0, float("nan"), 2.0], allow_nan=True)
    assert np.isnan(read_metadata_field(ds, "ppl")[1])
    with pytest.raises(MetadataError, match="must match"):
        write_metadata_field(ds, "../evil", [1, 2, 3])
    with pytest.raises(MetadataError, match="1-D"):
        write_metadata_field(ds, "x", np.zeros((3, 2)))
    with pytest.raises(MetadataError, match=r"no metadata field 'nope' \(has: \['ppl'\]\)"):
        read_metadata_field(ds, "nope")
    (tmp_path / "d.meta" / "manifest.json").write_text("{not json")
    with pytest.raises(MetadataError, match="manifest.json: not valid JSON"):
        read_metadata_field(ds, "ppl")


def test_stale_field_is_refused_after_the_dataset_changes(tmp_path):
    ds = make_dataset(tmp_path / "d", n=6)
    write_metadata_field(ds, "ppl", np.arange(6, dtype=np.float32))
    make_dataset(tmp_path / "d", n=6, shift=1)  # same document count, different lengths
    assert stale_metadata_fields(ds) == ["ppl"]
    with pytest.raises(MetadataError, match=r"ppl\.npy: stale metadata field 'ppl'.*recompute"):
        read_metadata_field(ds, "ppl")
    # writing another field does not make the stale one valid again
    write_metadata_field(ds, "topic", np.zeros(6, dtype=np.int16))
    assert stale_metadata_fields(ds) == ["ppl"]
    assert read_metadata_field(ds, "topic").shape == (6,)
    write_metadata_field(ds, "ppl", np.ones(6, dtype=np.float32))
    assert stale_metadata_fields(ds) == [] and read_metadata_field(ds, "ppl").sum() == 6


def test_memmap_values_are_streamed(tmp_path):
    ds = make_dataset(tmp_path / "d", n=5)
    src = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype=np.float64, shape=(5,))
    src[:] = [5, 4, 3, 2, 1]
    write_metadata_field(ds, "score", src)
    assert read_metadata_field(ds, "score").tolist() == [5, 4, 3, 2, 1]
