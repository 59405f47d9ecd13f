"""Sources filtered by a sidecar field (``where``): one topic of a corpus as its own source.

The filtered source reads only the matching documents, in its order (here ascending ppl),
each once per epoch, and two filtered views of one dataset split it without overlap.
"""

import numpy as np
import pytest

from megasyne.data.dataset import MixtureDataset
from megasyne.data.metadata import write_metadata_field
from megasyne.data.mixture import IndexBuildError, build_or_load_index
from megasyne.data.recipe import RecipeError, load_recipe
from tests.data_index.helpers import make_source, write_recipe


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    d = tmp_path_factory.mktemp("where")
    prefix = make_source(d, "web", n_docs=300, seed=3, min_len=5, max_len=40)
    topic = np.random.default_rng(0).integers(0, 4, 300).astype(np.int16)
    write_metadata_field(prefix, "topic", topic, description="topic id")
    lang = np.where(np.arange(300) % 2 == 0, "en", "zh").astype(object)
    write_metadata_field(prefix, "lang", lang, description="language")
    return d, prefix, topic, lang


def _recipe(d, prefix, sources, weights, samples=400):
    return write_recipe(d / "recipe.yaml", dict(
        seq_length=16, seed=5, on_exhaustion="new_epoch",
        sources={n: dict(prefix=prefix, **spec) for n, spec in sources.items()},
        stages=[dict(name="s1", samples=samples, weights=weights)]))


def test_filtered_sources_read_only_their_documents_in_order(web, tmp_path):
    d, prefix, topic, _ = web
    from megasyne.data.metadata import read_metadata_field

    ppl = read_metadata_field(prefix, "ppl")
    recipe = _recipe(tmp_path, prefix, {
        "science": {"order": "ascending:ppl", "where": {"topic": 1}},
        "rest": {"where": {"topic": [0, 2, 3]}},
    }, {"science": 0.3, "rest": 0.7})
    build_or_load_index(load_recipe(recipe), tmp_path / "index")
    ds = MixtureDataset(tmp_path / "index")
    read = {0: [], 1: []}
    for i in range(len(ds)):
        s = int(ds.source_id[i])
        docs = ds.sample_documents(i).tolist()
        read[s].extend(d for d in docs if not read[s] or read[s][-1] != d)
    science, rest = set(np.flatnonzero(topic == 1)), set(np.flatnonzero(topic != 1))
    assert set(read[0]) <= science and set(read[1]) <= rest
    # ascending ppl along the science stream within the first epoch, every document once
    first_epoch = read[0][:len(science)]
    assert sorted(first_epoch) == sorted(science)
    assert np.all(np.diff(ppl[first_epoch]) >= 0)
    # the tokens are those documents' tokens
    sample = ds[0]["tokens"]
    assert sample.shape == (17,)


def test_categorical_field_and_errors(web, tmp_path):
    d, prefix, _, lang = web
    recipe = _recipe(tmp_path, prefix, {"en": {"where": {"lang": "en"}}}, {"en": 1.0}, samples=50)
    build_or_load_index(load_recipe(recipe), tmp_path / "index")
    ds = MixtureDataset(tmp_path / "index")
    docs = np.concatenate([ds.sample_documents(i) for i in range(len(ds))])
    assert set(lang[docs]) == {"en"}

    nothing = _recipe(tmp_path, prefix, {"none": {"where": {"topic": 9}}}, {"none": 1.0})
    with pytest.raises(IndexBuildError, match="no document of .*web matches where {'topic': \\[9\\]}"):
        build_or_load_index(load_recipe(nothing), tmp_path / "index2")
    bad = _recipe(tmp_path, prefix, {"x": {"where": ["topic"]}}, {"x": 1.0})
    with pytest.raises(RecipeError, match="sources.x.where"):
        load_recipe(bad)


def test_changing_the_filter_field_rebuilds_the_index(web, tmp_path):
    d, prefix, topic, _ = web
    recipe = _recipe(tmp_path, prefix, {"t1": {"where": {"topic": 1}}}, {"t1": 1.0}, samples=50)
    build_or_load_index(load_recipe(recipe), tmp_path / "index")
    before = MixtureDataset(tmp_path / "index").fingerprint
    write_metadata_field(prefix, "topic", (topic + 1) % 4, description="relabelled")
    try:
        build_or_load_index(load_recipe(recipe), tmp_path / "index")
        assert MixtureDataset(tmp_path / "index").fingerprint != before
    finally:
        write_metadata_field(prefix, "topic", topic, description="topic id")
