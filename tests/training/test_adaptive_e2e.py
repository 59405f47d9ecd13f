"""The adaptive topic mixture in pretrain_syne.py, end to end on 2 gloo ranks.

One corpus with a ``topic`` sidecar field (drama / verse / poetry from the bundled tiny
corpus), three topic sources filtered by ``where``; the eval recipe holds out documents of
each topic. Every 3 steps the trainer measures the topics' validation perplexity and moves
the ratios; the poetry topic's measured perplexity is made to grow (the testing hook
fault_topic_ppl_growth), so its ratio must rise, by the paper's formula recomputed here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from tests.launch import REPO_ROOT
from tests.training.pretrain_launch import launch, records

CORPUS = REPO_ROOT / "examples" / "tiny" / "data"
TOPICS = ("drama", "verse", "poetry")
FILES = ("en_drama", "en_verse", "zh_poetry")
G, SEQ, STEPS, K, ALPHA, GROWTH = 8, 32, 12, 3, 0.5, 0.5
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess
    from megasyne.data.tokenizers import train_byte_level_bpe

    root = tmp_path_factory.mktemp("adaptive")
    train, held = [], []
    for topic, name in enumerate(FILES):
        docs = [json.loads(line) for line in (CORPUS / f"{name}.jsonl").open(encoding="utf-8")][:48]
        for j, d in enumerate(docs):
            (held if j % 6 == 5 else train).append(dict(text=d["text"], topic=topic))
    train_byte_level_bpe((d["text"] for d in train), 512, root / "tokenizer.json")
    for part, docs in (("train", train), ("held", held)):
        (root / f"{part}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n"
                                                    for d in docs), encoding="utf-8")
        run_preprocess(PreprocessConfig(inputs=[str(root / f"{part}.jsonl")],
                                        output_prefix=str(root / part),
                                        tokenizer=str(root / "tokenizer.json"),
                                        metadata_keys=["topic"], append_eod=True,
                                        log_interval=0, progress=False))

    def recipe(part, samples, order="shuffle"):
        return dict(seq_length=SEQ, seed=3, on_exhaustion="new_epoch", sources={
            t: {"prefix": str(root / f"{part}_text_document"), "where": {"topic": k},
                "order": order} for k, t in enumerate(TOPICS)},
            stages=[dict(name="all", samples=samples, weights={t: 1 for t in TOPICS})])

    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe("train", STEPS * G, "sequential")))
    (root / "eval.yaml").write_text(yaml.safe_dump(recipe("held", 24, "sequential")))
    (root / "base.yaml").write_text(yaml.safe_dump(dict(
        recipe="recipe.yaml", eval_recipe="eval.yaml", eval_samples=24, model="tiny_debug",
        model_overrides=dict(vocab_size=512, max_position_embeddings=SEQ),
        parallel=dict(tp=2), optim=dict(lr=2e-3), schedule=dict(kind="constant"),
        micro_batch_size=2, global_batch_size=G, save_interval=2, keep_last=10,
        adaptive=dict(topics=list(TOPICS), interval_steps=K, alpha=ALPHA,
                      lower=0.05, upper=0.8),
        fault_topic_ppl_growth=dict(poetry=GROWTH))))
    ref = launch(root, "ref")
    assert ref.returncode == 0, ref.stderr[-6000:]
    return root


def _decisions(recs):
    return [r for r in recs if r.get("adaptive")]


def test_a_rising_topic_gets_a_larger_share_by_the_formula(setup):
    recs = records(setup, "ref")
    dec = _decisions(recs)
    assert [d["step"] for d in dec] == [0, 3, 6, 9]
    ratios = [1 / 3] * 3  # the recipe's equal weights
    prev = None
    for d in dec:
        measured = [d["eval"][f"{t}/ppl"] for t in TOPICS]
        growth = (1 + GROWTH) ** (d["step"] // K)
        ppl = [measured[0], measured[1], measured[2] * growth]
        a = d["adaptive"]
        assert a["ppl"] == pytest.approx(ppl, rel=1e-12)
        if prev is not None:
            # The paper's rule, written out: d_i relative change, delta_i = d_i / max|d|,
            # f_i = 1 + alpha * delta_i, r_i <- r_i f_i / sum r_j f_j, then bounds [0.05, 0.8].
            change = [(p - q) / q for p, q in zip(ppl, prev)]
            delta = [c / max(abs(x) for x in change) for c in change]
            f = [1 + ALPHA * x for x in delta]
            total = sum(r * x for r, x in zip(ratios, f))
            new = [r * x / total for r, x in zip(ratios, f)]
            if max(new) <= 0.8 and min(new) >= 0.05:
                assert a["new_ratios"] == pytest.approx(new, rel=1e-12)
            else:  # held at the upper bound, the others keep their proportions
                assert a["clamped"] == ["poetry"] and a["new_ratios"][2] == pytest.approx(0.8)
                assert a["new_ratios"][0] / a["new_ratios"][1] == pytest.approx(new[0] / new[1])
            assert change[2] > 0 and a["new_ratios"][2] > ratios[2]  # poetry rose, so did its share
            ratios = a["new_ratios"]
        prev = ppl
    assert ratios[2] > 0.45  # from 1/3 after three adjustments


def test_each_interval_reads_the_new_ratios_without_repeating_a_sample(setup):
    from megasyne.data.dataset import MixtureDataset
    from megasyne.data.overlay import MixtureOverlay

    recs = records(setup, "ref")
    by_step = {r["step"]: r for r in recs}
    for d in _decisions(recs)[1:]:
        t, r = d["step"], d["adaptive"]["new_ratios"]
        counts = np.zeros(3)
        for s in range(t + 1, min(t + K, STEPS) + 1):
            counts += [by_step[s]["source_tokens"][name] // SEQ for name in TOPICS]
        n = counts.sum()
        assert np.all(np.abs(counts - np.asarray(r) * n) <= 2), (t, counts, r)
    # Every topic's stream is read contiguously from 0: no sample repeated or skipped.
    ds = MixtureDataset(setup / "ref" / "index")
    overlay = MixtureOverlay(ds, setup / "ref" / "adaptive")
    assert overlay.load_through(STEPS * G) == 3
    for k in range(3):
        used = np.sort(ds.source_sample[ds.source_id == k])
        assert np.array_equal(used, np.arange(used.size))


def test_kill_and_resume_with_adaptation_is_bit_identical(setup):
    killed = launch(setup, "killed", kill_at_step=8)
    assert killed.returncode != 0
    assert len(records(setup, "killed")) < STEPS + 1, "the job was not killed mid-run"
    resumed = launch(setup, "killed")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    a, b = records(setup, "ref"), records(setup, "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "data_crc", "adaptive", "source_tokens"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    for r in a:
        if "loss" in r:
            assert math.isfinite(r["loss"])


def test_reads_ahead_are_redone_after_each_re_blend(setup):
    """The reference reads ahead (data_prefetch: 2): the batches of the steps after each
    decision, read before it, are read again. A run reading every batch synchronously logs
    the same data, losses and decisions at every step."""
    sync = launch(setup, "sync_read", "data_prefetch=0")
    assert sync.returncode == 0, sync.stderr[-6000:]
    a, b = records(setup, "ref"), records(setup, "sync_read")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("data_crc", "source_tokens", "adaptive", "loss", "grad_norm"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
