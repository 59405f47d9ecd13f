"""Adaptive topic groups (megasyne/syne/topic_groups.py and the trainer's hook), without torchrun.

Two languages x three web topics, each language's topics one group re-weighted inside its own
web share. The hook is driven directly with made-up perplexities over a real mixture index of
synthetic datasets (two stages, intervals of 500 samples); the expected ratios are the paper's
formula written out here per group, and the expected shares come from the recipe's numbers
(zh web 0.2 x 0.7 = 0.14 of stage I, ...), not from the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from megasyne.syne.topic_groups import (
    check_groups_against_recipe,
    group_rules,
    leaf_parents,
    split_group_shares,
)
from megasyne.syne.topic_mixture import AdaptiveMixtureError
from tests.data_index.helpers import make_source, write_recipe

ZH, EN = ("zh_t0", "zh_t1", "zh_t2"), ("en_t0", "en_t1", "en_t2")
G, K, SEQ = 100, 5, 16
STAGE1, STAGE2 = 6200, 3000  # samples; the interval at step 60 crosses the stage boundary
ALPHA = {"zh_web": 0.5, "en_web": 0.3}
# Recipe numbers: stage I zh:en 2:8, web 0.7 of zh and 0.4 of en; stage II zh:en 1:9, web 0.5/0.5.
SHARES = [dict(zh=0.2, zh_web=0.2 * 0.7, zh_book=0.2 * 0.3, en=0.8, en_web=0.8 * 0.4,
               en_book=0.8 * 0.6),
          dict(zh=0.1, zh_web=0.1 * 0.5, zh_book=0.1 * 0.5, en=0.9, en_web=0.9 * 0.5,
               en_book=0.9 * 0.5)]


def _tree(zh, en, zh_web, en_web, zh_topics=(1, 1, 1), en_topics=(1, 1, 1)):
    return {"zh": {"weight": zh, "children": {
                "zh_web": {"weight": zh_web, "children": dict(zip(ZH, zh_topics))},
                "zh_book": 1 - zh_web}},
            "en": {"weight": en, "children": {
                "en_web": {"weight": en_web, "children": dict(zip(EN, en_topics))},
                "en_book": 1 - en_web}}}


STAGES = [{"name": "stage1", "weights": _tree(2, 8, 0.7, 0.4, zh_topics=(2, 1, 1))},
          {"name": "stage2", "weights": _tree(1, 9, 0.5, 0.5)}]


# ------------------------------------------------------------------ the arithmetic by hand

def test_split_keeps_every_share_outside_the_groups():
    # stage I flat: zh topics .14 * (2, 1, 1) / 4, zh_book .06, en topics .32 / 3, en_book .48
    w = {"zh_t0": 0.07, "zh_t1": 0.035, "zh_t2": 0.035, "zh_book": 0.06,
         "en_t0": 0.32 / 3, "en_t1": 0.32 / 3, "en_t2": 0.32 / 3, "en_book": 0.48}
    out = split_group_shares(w, [(ZH, (0.2, 0.5, 0.3)), (EN, (0.6, 0.3, 0.1))])
    assert [out[t] for t in ZH] == pytest.approx([0.028, 0.07, 0.042], rel=1e-12)
    assert [out[t] for t in EN] == pytest.approx([0.192, 0.096, 0.032], rel=1e-12)
    assert out["zh_book"] == 0.06 and out["en_book"] == 0.48
    zh = sum(out[t] for t in ZH) + out["zh_book"]
    assert zh == pytest.approx(0.2, rel=1e-12)  # the language share is the recipe's
    # a group the stage does not weight gets nothing
    assert split_group_shares({"a": 1.0}, [(("x", "y"), (0.5, 0.5))]) == {"a": 1.0}


def test_parents_of_the_weight_tree():
    parents = leaf_parents(STAGES[0]["weights"], "stages[0].weights")
    assert parents["zh_t1"] == "stages[0].weights.zh.zh_web"
    assert parents["en_book"] == "stages[0].weights.en"
    check_groups_against_recipe(STAGES, {"g.zh": ZH, "g.en": EN})


def test_a_group_across_two_parents_is_refused():
    with pytest.raises(AdaptiveMixtureError, match=(
            r"adaptive.topics: the topics do not share a parent in stage 'stage1' \(\['zh_t0', "
            r"'zh_t1'\] under stages\[0\].weights.zh.zh_web; \['en_t0'\] under "
            r"stages\[0\].weights.en.en_web\).*one group per parent")):
        check_groups_against_recipe(STAGES, {"adaptive.topics": ("zh_t0", "zh_t1", "en_t0")})
    with pytest.raises(AdaptiveMixtureError, match="do not share a parent"):  # topic and book
        check_groups_against_recipe(STAGES, {"g": ("zh_t0", "zh_book")})


def test_a_group_partly_in_a_stage_is_refused():
    stages = [STAGES[0], {"name": "late", "weights": {"zh_t0": 1, "zh_t1": 1, "en_t0": 1}}]
    with pytest.raises(AdaptiveMixtureError, match=(
            r"g.zh: stage 'late' weights \['zh_t0', 'zh_t1'\] but not \['zh_t2'\]")):
        check_groups_against_recipe(stages, {"g.zh": ZH})


def test_group_rules_defaults_overrides_and_errors():
    rules = group_rules({"zh_web": {"topics": list(ZH), "alpha": 0.2},
                         "en_web": {"topics": list(EN), "upper": 0.9}},
                        alpha=0.5, weights={"zh_t1": 2.0, "en_t0": 3.0}, lower=0.05,
                        upper=0.8, normalise="max_abs")
    assert list(rules) == ["zh_web", "en_web"]
    assert rules["zh_web"].alpha == 0.2 and rules["en_web"].alpha == 0.5
    assert rules["zh_web"].w == (1.0, 2.0, 1.0) and rules["en_web"].w == (3.0, 1.0, 1.0)
    assert rules["zh_web"].hi == (0.8,) * 3 and rules["en_web"].hi == (0.9,) * 3
    defaults = dict(alpha=0.5, weights=None, lower=None, upper=None, normalise="max_abs")
    for groups, match in [
        ({"a": {"topics": ["x", "y"]}, "b": {"topics": ["y"]}},
         r"topic 'y' is in two groups, adaptive.groups.a and adaptive.groups.b"),
        ({"a": {"topics": ["x"], "beta": 1}}, r"unknown keys in adaptive.groups.a: \['beta'\]"),
        ({"a": {"topics": "x"}}, r"adaptive.groups.a.topics must be a non-empty list"),
        ({"a": ["x"]}, r"adaptive.groups.a must be a mapping"),
        ({}, r"adaptive.groups must be a non-empty mapping"),
        ({"a": {"topics": ["x", "y"], "lower": 0.6}}, r"adaptive.groups.a bounds are infeasible"),
        ({"a": {"topics": ["x"], "alpha": -1}}, r"adaptive.groups.a.alpha must be"),
    ]:
        with pytest.raises(AdaptiveMixtureError, match=match):
            group_rules(groups, **defaults)
    with pytest.raises(AdaptiveMixtureError, match=r"adaptive.weights: unknown topics \['z'\]"):
        group_rules({"a": {"topics": ["x"]}}, **{**defaults, "weights": {"z": 1.0}})


# ------------------------------------------------------------------ the hook on a real index

@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from megasyne.data.metadata import write_metadata_field
    from megasyne.data.mixture import build_or_load_index
    from megasyne.data.recipe import load_recipe

    d = tmp_path_factory.mktemp("topic_groups")
    sources = {}
    for lang, topics, seed in (("zh", ZH, 1), ("en", EN, 2)):
        web = make_source(d, f"{lang}_web", n_docs=900, seed=seed, min_len=5, max_len=40)
        write_metadata_field(web, "topic", (np.arange(900) % 3).astype(np.int16),
                             description="topic id")
        for k, t in enumerate(topics):  # the paper's curriculum order, one topic per source
            sources[t] = {"prefix": web, "order": "ascending:ppl", "where": {"topic": k}}
        sources[f"{lang}_book"] = {"prefix": make_source(d, f"{lang}_book", n_docs=400,
                                                         seed=seed + 10, metric=None),
                                   "order": "sequential"}
    recipe = write_recipe(d / "recipe.yaml", dict(
        seq_length=SEQ, seed=3, on_exhaustion="new_epoch", sources=sources,
        stages=[dict(name=s["name"], samples=n, weights=s["weights"])
                for s, n in zip(STAGES, (STAGE1, STAGE2))]))
    build_or_load_index(load_recipe(recipe), d / "index")
    return d / "index"


def _config(**kw):
    from megasyne.training.hooks.adaptive_mixture import AdaptiveTrainConfig

    return AdaptiveTrainConfig(groups={"zh_web": {"topics": list(ZH), "alpha": ALPHA["zh_web"]},
                                       "en_web": {"topics": list(EN)}},
                               interval_steps=K, alpha=ALPHA["en_web"], **kw)


def _hook(index_dir, run_dir, cfg=None):
    from megasyne.data.dataset import MixtureDataset
    from megasyne.training.hooks.adaptive_mixture import AdaptiveMixtureHook

    return AdaptiveMixtureHook(cfg or _config(), MixtureDataset(index_dir), list(ZH + EN), run_dir,
                               global_batch_size=G, is_writer=True)


def _ppl(step):
    """Made-up validation perplexities: every topic improves, zh_t1 and en_t2 are forgotten."""
    k = step // K
    out = {t: 20.0 * 0.97 ** k * (1 + 0.01 * i) for i, t in enumerate(ZH + EN)}
    out["zh_t1"] = 20.0 * 1.3 ** k
    out["en_t2"] = 25.0 * 1.1 ** k
    return {f"{t}/ppl": p for t, p in out.items()}


STEPS = range(0, (STAGE1 + STAGE2) // G, K)  # 0, 5, ..., 85


def _expected_ratios():
    """The paper's rule per group, written out: d, delta = d / max|d|, f = 1 + alpha delta,
    r <- r f / sum r f (bounds 0..1 never bind here)."""
    ratios = {"zh_web": [0.5, 0.25, 0.25], "en_web": [1 / 3] * 3}  # stage I's split
    out, prev = {}, None
    for step in STEPS:
        ppl = _ppl(step)
        for name, topics in (("zh_web", ZH), ("en_web", EN)):
            if prev is not None:
                change = [(ppl[f"{t}/ppl"] - prev[f"{t}/ppl"]) / prev[f"{t}/ppl"] for t in topics]
                delta = [c / max(abs(x) for x in change) for c in change]
                f = [1 + ALPHA[name] * x for x in delta]
                total = sum(r * x for r, x in zip(ratios[name], f))
                ratios[name] = [r * x / total for r, x in zip(ratios[name], f)]
            out[step, name] = list(ratios[name])
        prev = ppl
    return out


def _max_prefix_error(ids: np.ndarray, members: list[int], share: float) -> float:
    counts = np.cumsum(np.isin(ids, members))
    return float(np.abs(counts - share * np.arange(1, ids.size + 1)).max())


def test_groups_adapt_by_the_formula_and_keep_language_and_source_shares(index_dir, tmp_path):
    hook = _hook(index_dir, tmp_path / "run")
    names = hook.overlay.dataset.source_names
    sid = {n: i for i, n in enumerate(names)}
    expected = _expected_ratios()
    decisions = [hook.decide(step, _ppl(step)) for step in STEPS]
    ids = np.asarray(hook.overlay.dataset.source_id)
    for step, d in zip(STEPS, decisions):
        assert set(d["groups"]) == {"zh_web", "en_web"}
        for name in ("zh_web", "en_web"):
            assert d["groups"][name]["new_ratios"] == pytest.approx(expected[step, name], rel=1e-12)
        if step == 0:
            assert "interval" not in d
            continue
        # Every piece of the interval (one per stage it covers) is blended on its own: at every
        # prefix of it each share is the recipe's, each topic its group's share x its ratio.
        first, end = d["interval"]
        assert (first, end) == (step * G, min(step + K, len(ids) // G) * G)
        for stage, (a, b) in enumerate(((0, STAGE1), (STAGE1, STAGE1 + STAGE2))):
            lo, hi = max(first, a), min(end, b)
            if lo >= hi:
                continue
            piece, sh = ids[lo:hi], SHARES[stage]
            checks = [([sid[t] for t in ZH] + [sid["zh_book"]], sh["zh"]),
                      ([sid[t] for t in EN] + [sid["en_book"]], sh["en"]),
                      ([sid[t] for t in ZH], sh["zh_web"]), ([sid[t] for t in EN], sh["en_web"]),
                      ([sid["zh_book"]], sh["zh_book"]), ([sid["en_book"]], sh["en_book"])]
            for lang, topics in (("zh", ZH), ("en", EN)):
                r = d["groups"][f"{lang}_web"]["new_ratios"]
                checks += [([sid[t]], sh[f"{lang}_web"] * x) for t, x in zip(topics, r)]
            for members, share in checks:
                assert _max_prefix_error(piece, members, share) <= 2, (step, stage, members)
    # The forgotten topics gained share inside their own language's web data.
    last = decisions[-1]["groups"]
    assert last["zh_web"]["new_ratios"][1] > 0.6 and last["en_web"]["new_ratios"][2] > 0.5
    # Every topic's stream is read contiguously from 0 (nothing repeated or skipped).
    samples = np.asarray(hook.overlay.dataset.source_sample)
    for t in ZH + EN:
        assert np.array_equal(samples[ids == sid[t]], np.arange(np.sum(ids == sid[t])))


def test_resume_from_a_saved_state_decides_and_reads_identically(index_dir, tmp_path):
    ref = _hook(index_dir, tmp_path / "ref")
    ref_decisions = [ref.decide(step, _ppl(step)) for step in STEPS]
    # A run checkpointed after the decision at step 30, then killed after deciding step 35
    # (its interval file is written, its checkpoint is not).
    run = _hook(index_dir, tmp_path / "run")
    for step in STEPS:
        run.decide(step, _ppl(step))
        if step == 30:
            state = json.loads(json.dumps(run.state_dict()))  # the manifest is JSON
        if step == 35:
            break
    assert set(state) == {"groups"} and state["groups"]["zh_web"]["last_step"] == 30
    resumed = _hook(index_dir, tmp_path / "run")
    assert resumed.load_state_dict(state, checkpoint="iter_30") == 6  # intervals 5..30
    decisions = [resumed.decide(step, _ppl(step)) for step in STEPS if step > 30]
    assert decisions == ref_decisions[7:]
    for key in ("source_id", "source_sample"):
        assert np.array_equal(getattr(resumed.overlay.dataset, key),
                              getattr(ref.overlay.dataset, key))


def test_state_of_another_form_or_other_groups_is_refused(index_dir, tmp_path):
    from megasyne.training.hooks.adaptive_mixture import AdaptiveTrainConfig

    hook = _hook(index_dir, tmp_path / "run")
    hook.decide(0, _ppl(0))
    state = hook.state_dict()
    one = AdaptiveTrainConfig(topics=list(ZH), interval_steps=K)
    with pytest.raises(AdaptiveMixtureError, match="iter_5 was saved with adaptive.groups"):
        _hook(index_dir, tmp_path / "b", one).load_state_dict(state, checkpoint="iter_5")
    other = AdaptiveTrainConfig(groups={"zh": {"topics": list(ZH)}, "en": {"topics": list(EN)}},
                                interval_steps=K)
    with pytest.raises(AdaptiveMixtureError, match=r"iter_5: adaptive state has groups "
                                                   r"\['zh_web', 'en_web'\], this run has"):
        _hook(index_dir, tmp_path / "c", other).load_state_dict(state, checkpoint="iter_5")


def test_the_one_group_form_keeps_its_records_and_refuses_mixed_languages(index_dir, tmp_path):
    from megasyne.training.hooks.adaptive_mixture import AdaptiveTrainConfig

    hook = _hook(index_dir, tmp_path / "one", AdaptiveTrainConfig(topics=list(EN), interval_steps=K))
    d = hook.decide(0, _ppl(0))
    assert d["topics"] == list(EN) and "groups" not in d
    assert set(hook.state_dict()) == {"topics", "ratios", "last_ppl", "last_step"}
    d = hook.decide(K, _ppl(K))
    assert d["interval"] == [K * G, 2 * K * G] and d["new_ratios"][2] > 1 / 3
    with pytest.raises(AdaptiveMixtureError, match=r"adaptive.topics: the topics do not share a "
                                                   r"parent in stage 'stage1'"):
        _hook(index_dir, tmp_path / "mixed", AdaptiveTrainConfig(topics=list(ZH + EN),
                                                                interval_steps=K))
    with pytest.raises(AdaptiveMixtureError, match=r"adaptive.groups.zh_web.topics: \['nope'\] "
                                                   r"are not sources of the training recipe"):
        _hook(index_dir, tmp_path / "x", AdaptiveTrainConfig(
            groups={"zh_web": {"topics": ["nope"]}}, interval_steps=K))
