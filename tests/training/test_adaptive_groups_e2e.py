"""Adaptive topic groups in pretrain_syne.py, end to end on 2 gloo ranks (one launch).

The bundled tiny corpus as two languages: Chinese web (zh_poetry, three topics) and book, English
web (en_verse, three topics) and book (en_drama), weighted zh:en = 2:8 with web 0.7 of zh and
0.4 of en. Each language's web topics are one group (``adaptive.groups``); the zh_t1 topic's
measured perplexity is made to grow (fault_topic_ppl_growth). Checked: each group's ratios are
the paper's formula recomputed here from the logged perplexities; in every re-blended interval
the zh:en, web and book shares are the recipe's and each topic gets its group's share x its
ratio, within 2 samples at every prefix; the trainer read exactly those samples; the checkpoint
holds the per-group ratios. (Resume of the grouped state: tests/syne/test_topic_groups.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.launch import REPO_ROOT
from tests.training.pretrain_launch import launch, records

CORPUS = REPO_ROOT / "examples" / "tiny" / "data"
ZH, EN = ("zh_t0", "zh_t1", "zh_t2"), ("en_t0", "en_t1", "en_t2")
G, SEQ, STEPS, K, GROWTH = 16, 32, 9, 3, 0.5
ALPHA = {"zh_web": 0.5, "en_web": 0.3}
SHARES = dict(zh=0.2, en=0.8, zh_web=0.14, en_web=0.32, zh_book=0.06, en_book=0.48)
pytestmark = pytest.mark.slow


def _jsonl(name):
    return [json.loads(line) for line in (CORPUS / f"{name}.jsonl").open(encoding="utf-8")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess
    from megasyne.data.tokenizers import train_byte_level_bpe

    root = tmp_path_factory.mktemp("adaptive_groups")
    zh, en = _jsonl("zh_poetry"), _jsonl("en_verse")
    datasets = {"zh_web": zh[:150], "zh_book": zh[150:250], "en_web": en, "en_book": _jsonl("en_drama")}
    train = {n: [] for n in datasets}
    held = {"zh_web": [], "en_web": []}
    for name, docs in datasets.items():
        for j, d in enumerate(docs):  # web pages labelled by position: topic j % 3
            doc = dict(text=d["text"], topic=j % 3)
            (held[name] if name in held and j % 5 == 4 else train[name]).append(doc)
    train_byte_level_bpe((d["text"] for docs in train.values() for d in docs), 512,
                         root / "tokenizer.json")
    for name, docs in [*train.items(), *((f"{n}_held", d) for n, d in held.items())]:
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n"
                                                    for d in docs), encoding="utf-8")
        run_preprocess(PreprocessConfig(inputs=[str(root / f"{name}.jsonl")],
                                        output_prefix=str(root / name),
                                        tokenizer=str(root / "tokenizer.json"),
                                        metadata_keys=["topic"], append_eod=True,
                                        log_interval=0, progress=False))

    def topics(part):
        return {t: {"prefix": str(root / f"{lang}_web{part}_text_document"),
                    "where": {"topic": k}, "order": "sequential"}
                for lang, ts in (("zh", ZH), ("en", EN)) for k, t in enumerate(ts)}

    def web(weight, ts):
        return {"weight": weight, "children": {t: 1 for t in ts}}

    recipe = dict(seq_length=SEQ, seed=3, on_exhaustion="new_epoch", sources={
        **topics(""), **{b: str(root / f"{b}_text_document") for b in ("zh_book", "en_book")}},
        stages=[dict(name="all", samples=STEPS * G, weights={
            "zh": {"weight": 2, "children": {"zh_web": web(0.7, ZH), "zh_book": 0.3}},
            "en": {"weight": 8, "children": {"en_web": web(0.4, EN), "en_book": 0.6}}})])
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "eval.yaml").write_text(yaml.safe_dump(dict(
        seq_length=SEQ, seed=3, on_exhaustion="new_epoch", sources=topics("_held"),
        stages=[dict(name="all", samples=24, weights={t: 1 for t in ZH + EN})])))
    (root / "base.yaml").write_text(yaml.safe_dump(dict(
        recipe="recipe.yaml", eval_recipe="eval.yaml", eval_samples=24, model="tiny_debug",
        model_overrides=dict(vocab_size=512, max_position_embeddings=SEQ),
        parallel=dict(tp=2), optim=dict(lr=2e-3), schedule=dict(kind="constant"),
        micro_batch_size=4, global_batch_size=G, save_interval=STEPS, keep_last=2,
        adaptive=dict(groups={"zh_web": {"topics": list(ZH), "alpha": ALPHA["zh_web"]},
                              "en_web": {"topics": list(EN)}},
                      interval_steps=K, alpha=ALPHA["en_web"], lower=0.05, upper=0.8),
        fault_topic_ppl_growth={"zh_t1": GROWTH})))
    done = launch(root, "run")
    assert done.returncode == 0, done.stderr[-6000:] + done.stdout[-3000:]
    return root


def test_groups_follow_the_formula_and_keep_every_share(run):
    from megasyne.checkpoint.dist import read_manifest
    from megasyne.data.dataset import MixtureDataset
    from megasyne.data.overlay import MixtureOverlay

    recs = records(run, "run")
    decisions = [r for r in recs if r.get("adaptive")]
    assert [d["step"] for d in decisions] == [0, 3, 6]
    ratios, prev = {"zh_web": [1 / 3] * 3, "en_web": [1 / 3] * 3}, None
    for d in decisions:
        ppl = {t: d["eval"][f"{t}/ppl"] for t in ZH + EN}
        ppl["zh_t1"] *= (1 + GROWTH) ** (d["step"] // K)
        for name, topics in (("zh_web", ZH), ("en_web", EN)):
            a = d["adaptive"]["groups"][name]
            assert a["topics"] == list(topics)
            assert a["ppl"] == pytest.approx([ppl[t] for t in topics], rel=1e-12)
            if prev is not None:  # the paper's rule, written out, inside the group only
                change = [(ppl[t] - prev[t]) / prev[t] for t in topics]
                delta = [c / max(abs(x) for x in change) for c in change]
                f = [1 + ALPHA[name] * x for x in delta]
                total = sum(r * x for r, x in zip(ratios[name], f))
                ratios[name] = [r * x / total for r, x in zip(ratios[name], f)]
                assert a["clamped"] == [] and a["alpha"] == ALPHA[name]
            assert a["new_ratios"] == pytest.approx(ratios[name], rel=1e-12)
        prev = ppl
    assert ratios["zh_web"][1] > 0.45  # zh_t1 was forgotten twice: its share of zh web rose

    ds = MixtureDataset(run / "run" / "index")
    assert MixtureOverlay(ds, run / "run" / "adaptive").load_through(STEPS * G) == 2
    ids, names = np.asarray(ds.source_id), ds.source_names
    sid = {n: i for i, n in enumerate(names)}
    groups = {"zh": [*ZH, "zh_book"], "en": [*EN, "en_book"], "zh_web": ZH, "en_web": EN,
              "zh_book": ["zh_book"], "en_book": ["en_book"]}
    for d in decisions[1:]:
        first, end = d["adaptive"]["interval"]
        assert (first, end) == (d["step"] * G, (d["step"] + K) * G)
        piece = ids[first:end]
        expect = [(groups[g], share) for g, share in SHARES.items()]
        for name, topics in (("zh_web", ZH), ("en_web", EN)):
            r = d["adaptive"]["groups"][name]["new_ratios"]
            expect += [([t], SHARES[name] * x) for t, x in zip(topics, r)]
        for members, share in expect:
            counts = np.cumsum(np.isin(piece, [sid[m] for m in members]))
            err = np.abs(counts - share * np.arange(1, piece.size + 1)).max()
            assert err <= 2, (d["step"], members, share, err)
    # The trainer read those samples: every step's tokens per source are the overlay's.
    for r in recs:
        if "source_tokens" in r:
            step_ids = ids[(r["step"] - 1) * G:r["step"] * G]
            assert {n: int(np.sum(step_ids == sid[n])) * SEQ for n in names} == \
                {n: r["source_tokens"].get(n, 0) for n in names}, r["step"]
    # The checkpoint carries each group's ratios and last perplexities.
    state = read_manifest(run / "run" / "checkpoints")["extra"]["adaptive"]
    for name in ("zh_web", "en_web"):
        saved = state["groups"][name]
        assert saved["last_step"] == 6 and saved["ratios"] == decisions[-1]["adaptive"]["groups"][
            name]["new_ratios"]
