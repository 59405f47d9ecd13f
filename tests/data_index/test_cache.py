"""(4) determinism and (5) cache invalidation of the index directory."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from megasyne.data.dataset import IndexMismatchError, MixtureDataset
from megasyne.data.metadata import read_metadata_field, write_metadata_field
from megasyne.data.mixture import build_or_load_index
from tests.data_index.conftest import fits_recipe
from tests.data_index.helpers import make_source, write_recipe


def files_of(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_recipe_and_data_give_bit_identical_files(data_dir, fits_index, tmp_path):
    again = build_or_load_index(data_dir / "fits.yaml", tmp_path / "again")
    assert again.rebuilt
    a, b = files_of(fits_index), files_of(again.path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name


@pytest.fixture()
def own_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    make_source(d, "web_en", n_docs=300, seed=1)
    make_source(d, "web_zh", n_docs=200, seed=2)
    make_source(d, "book", n_docs=150, seed=3, max_len=90, metric=None)
    make_source(d, "code", n_docs=100, seed=4, metric=None)
    return d


def test_cache_is_reused_only_while_everything_matches(own_data, tmp_path, caplog):
    recipe = write_recipe(own_data / "r.yaml", fits_recipe())
    out = tmp_path / "index"
    caplog.set_level(logging.INFO, logger="megasyne.data.mixture")

    first = build_or_load_index(recipe, out)
    assert first.rebuilt and first.reason == "no index yet"
    hit = build_or_load_index(recipe, out)
    assert not hit.rebuilt and hit.fingerprint == first.fingerprint
    assert "reusing" in caplog.text

    # a changed .idx (the data of one source rewritten) -> rebuilt, and the log says why
    make_source(own_data, "book", n_docs=151, seed=33, max_len=90, metric=None)
    for verify in ("fast", "full"):
        with pytest.raises(IndexMismatchError, match="book"):
            MixtureDataset(out, verify=verify)  # the stale index refuses to serve the new data
    caplog.clear()
    r = build_or_load_index(recipe, out)
    assert r.rebuilt and "source book data" in r.reason and r.fingerprint != first.fingerprint
    assert "stale cache" in caplog.text and "source book data" in caplog.text
    MixtureDataset(out)  # fine again

    # a changed metric sidecar -> rebuilt
    prefix = str(own_data / "web_en")
    ppl = read_metadata_field(prefix, "ppl").copy()
    ppl[:10] += 1.0
    write_metadata_field(prefix, "ppl", ppl)
    r2 = build_or_load_index(recipe, out)
    assert r2.rebuilt and "source web_en metric sidecar" in r2.reason

    # a changed recipe -> rebuilt; then unchanged again -> cache hit
    changed = fits_recipe()
    changed["stages"][1]["weights"]["book"] = 0.3
    write_recipe(own_data / "r.yaml", changed)
    r3 = build_or_load_index(recipe, out)
    assert r3.rebuilt and r3.reason == "stale cache, changed: recipe stages[1].weights.book (0.2 -> 0.3)"
    assert not build_or_load_index(recipe, out).rebuilt
    assert build_or_load_index(recipe, out, force=True).rebuilt
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".index.")]
    assert leftovers in ([], [".index.lock"])


def test_a_half_written_index_is_never_trusted(own_data, tmp_path):
    recipe = write_recipe(own_data / "r.yaml", fits_recipe())
    out = tmp_path / "index"
    out.mkdir()
    (out / "source_id.npy").write_bytes(b"garbage")  # e.g. a crashed older tool
    r = build_or_load_index(recipe, out)
    assert r.rebuilt and r.reason == "no readable index.json"
    ds = MixtureDataset(out)
    assert len(ds) == sum(np.load(out / "stage_boundaries.npy")[-1:])
    assert not os.path.exists(out / "garbage")
