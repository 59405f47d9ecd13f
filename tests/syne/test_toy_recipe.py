"""The SynE sequence of examples/syne/README.md at toy scale (examples/syne/run_toy.py), in CI:
convert -> preprocess -> score_ppl -> label_topics -> synth_qa -> preprocess synthetic ->
build_mixture -> pretrain_syne stage I -> stage II, each the documented command line.
Checked: every step's output feeds the next as the recipe says. The run is the session fixture
``syne_toy`` (tests/syne/conftest.py), shared with test_synth_smollm2.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.launch import REPO_ROOT

pytestmark = pytest.mark.slow


def test_web_sources_are_read_in_ascending_perplexity(syne_toy):
    from megasyne.data.dataset import MixtureDataset
    from megasyne.data.metadata import read_metadata_field

    index = MixtureDataset(syne_toy / "run" / "index")
    for name in ("en_web", "zh_web"):
        prefix = str(syne_toy / "data" / f"{name}_text_document")
        ppl = read_metadata_field(prefix, "ppl")
        assert np.all(np.isfinite(ppl) | (ppl == np.inf)) and np.all(ppl > 1)
        s = index.source_names.index(name)
        docs = []
        for i in np.flatnonzero(np.asarray(index.source_id) == s):
            for d in index.sample_documents(int(i)).tolist():
                if not docs or docs[-1] != d:
                    docs.append(d)
        first_epoch = docs[:len(ppl)]
        assert np.all(np.diff(ppl[first_epoch]) >= 0), name


def test_web_documents_carry_a_topic_of_the_taxonomy(syne_toy):
    import yaml

    from megasyne.data.metadata import read_metadata_field

    taxonomy = yaml.safe_load((REPO_ROOT / "examples/syne/taxonomy.yaml").read_text())
    for name, lang in (("en_web", "en"), ("zh_web", "zh")):
        topics = read_metadata_field(str(syne_toy / "data" / f"{name}_text_document"), "topic",
                                     decode=True)
        assert len(topics) > 0 and set(map(str, topics)) <= set(_topic_ids(taxonomy, lang))


def _topic_ids(taxonomy: dict, lang: str) -> list[str]:
    return [t["id"] for t in taxonomy["languages"][lang]["topics"]]


def test_synthetic_qa_is_read_in_stage_two_only(syne_toy):
    qa = [json.loads(line) for line in (syne_toy / "synth" / "qa.jsonl").read_text().splitlines()]
    assert qa and all(r["text"].startswith("Problem: ") and r["seed_id"] for r in qa)
    recs = [json.loads(line) for line in (syne_toy / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert [r["stage"] for r in recs] == ["stage1"] * 6 + ["stage2"] * 4
    synth = [r["source_tokens"]["synthetic_qa"] for r in recs]
    assert synth[:6] == [0] * 6 and sum(synth[6:]) > 0
    # stage II reads zh : en : synthetic = 1 : 7 : 2 (exact within the blend's bound)
    counts = {s: sum(r["source_tokens"][s] for r in recs[6:]) // 64 for s in recs[6]["source_tokens"]}
    assert abs(counts["synthetic_qa"] - 0.2 * 32) <= 2 and abs(counts["zh_web"] - 0.1 * 32) <= 2
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert (syne_toy / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000010"
