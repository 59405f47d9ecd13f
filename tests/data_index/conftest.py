"""Session fixtures: four small sources (two PPL-ordered, one shuffled, one sequential) and two
built indexes over them: ``fits`` (on_exhaustion: fail, no source wraps) and ``wraps``
(new_epoch, several sources go through 2-4 epochs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data_index.helpers import make_source, write_recipe

SEQ = 16


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixture_data")
    make_source(d, "web_en", n_docs=300, seed=1)
    make_source(d, "web_zh", n_docs=200, seed=2)
    make_source(d, "book", n_docs=150, seed=3, max_len=90, metric=None)
    make_source(d, "code", n_docs=100, seed=4, metric=None)
    return d


SOURCES = {
    "web_en": {"prefix": "web_en", "order": "ascending:ppl"},
    "web_zh": {"prefix": "web_zh", "order": "descending:ppl"},
    "book": {"prefix": "book", "order": "shuffle"},
    "code": {"prefix": "code", "order": "sequential"},
}


def fits_recipe() -> dict:
    return {
        "seq_length": SEQ, "seed": 7, "on_exhaustion": "fail", "sources": SOURCES,
        "stages": [
            {"name": "bilingual", "samples": 700, "lr": 1.0e-5,
             "weights": {"zh": {"weight": 2, "children": {"web_zh": 1.0}},
                         "en": {"weight": 8, "children": {"web_en": 0.5, "book": 0.3,
                                                          "code": 0.2}}}},
            {"name": "synthetic", "tokens": 300 * SEQ,
             "weights": {"web_zh": 0.1, "web_en": 0.5, "book": 0.2, "code": 0.2}},
        ],
    }


def wraps_recipe() -> dict:
    r = fits_recipe()
    r["on_exhaustion"] = "new_epoch"
    r["stages"][0]["samples"] = 2500
    r["stages"][1]["samples"] = r["stages"][1].pop("tokens") // SEQ * 3
    return r


@pytest.fixture(scope="session")
def fits_index(data_dir, tmp_path_factory):
    from megasyne.data.mixture import build_or_load_index

    recipe = write_recipe(data_dir / "fits.yaml", fits_recipe())
    out = tmp_path_factory.mktemp("fits") / "index"
    build_or_load_index(recipe, out)
    return out


@pytest.fixture(scope="session")
def wraps_index(data_dir, tmp_path_factory):
    from megasyne.data.mixture import build_or_load_index

    recipe = write_recipe(data_dir / "wraps.yaml", wraps_recipe())
    out = tmp_path_factory.mktemp("wraps") / "index"
    build_or_load_index(recipe, out)
    return out
