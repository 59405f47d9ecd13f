"""Recipe YAML -> validated dataclasses: hierarchy, normalisation, errors naming the field path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megasyne.data.recipe import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]


def base(**over) -> dict:
    r = {"seq_length": 100, "sources": {"a": "data/a", "b": {"prefix": "/abs/b", "order": "ascending:ppl"},
                                        "c": {"prefix": "c", "order": "sequential"}},
         "stages": [{"name": "one", "tokens": 1001, "weights": {"a": 1, "b": 3}},
                    {"name": "two", "samples": 5, "lr": 3e-5, "schedule": {"decay": True},
                     "weights": {"g": {"weight": 0.2, "children": {"a": 0.7, "b": 0.3}},
                                 "c": 0.8}}]}
    r.update(over)
    return r


def test_parse_and_derive(tmp_path):
    r = Recipe.from_dict(base(), base_dir=tmp_path)
    assert r.source_names == ["a", "b", "c"]
    assert r.sources["a"].prefix == str(tmp_path / "data" / "a")   # relative -> recipe dir
    assert r.sources["b"].prefix == "/abs/b"
    assert r.sources["a"].order == "shuffle" and r.sources["a"].shuffled
    assert (r.sources["b"].kind, r.sources["b"].metric) == ("ascending", "ppl")
    assert r.seed == 1234 and r.on_exhaustion == "fail"
    assert r.stage_num_samples() == [11, 5]  # ceil(1001 / 100)
    assert r.stages[0].leaf_weights(r.source_names) == [0.25, 0.75, 0.0]
    w = r.stages[1].leaf_weights(r.source_names)
    assert all(math.isclose(x, y) for x, y in zip(w, [0.14, 0.06, 0.8]))
    assert r.stages[1].extra == {"lr": 3e-5, "schedule": {"decay": True}}  # kept untouched
    again = Recipe.from_dict(r.to_dict())  # resolved form round-trips
    assert again == r


@pytest.mark.parametrize("mutate, path, reason", [
    (lambda r: r["stages"][1]["weights"]["g"]["children"].update(a=0), "stages[1].weights.g.a",
     "weight must be > 0"),
    (lambda r: r["stages"][0]["weights"].update(a=-1), "stages[0].weights.a", "weight must be > 0"),
    (lambda r: r["stages"][0]["weights"].update(zz=1), "stages[0].weights.zz", "unknown source"),
    (lambda r: r["stages"][0].pop("tokens"), "stages[0]", "exactly one of"),
    (lambda r: r["stages"][0].update(samples=3), "stages[0]", "exactly one of"),
    (lambda r: r["stages"][0].update(tokens=0), "stages[0].tokens", "must be > 0"),
    (lambda r: r["stages"][0].update(tokens="abc"), "stages[0].tokens", "expected a count"),
    (lambda r: r["stages"][1].update(name="one"), "stages[1].name", "duplicate"),
    (lambda r: r["stages"][0].update(name="a b"), "stages[0].name", "must match"),
    (lambda r: r["sources"].update(d={"prefix": "d", "order": "random"}), "sources.d.order",
     "must be one of"),
    (lambda r: r["sources"].update(d={"prefix": "d", "order": "ascending"}), "sources.d.order",
     "needs a metric"),
    (lambda r: r["sources"].update(d={"prefix": "d", "oder": "shuffle"}), "sources.d.oder",
     "unknown key"),
    (lambda r: r.update(seq_length=0), "seq_length", ">= 1"),
    (lambda r: r.update(on_exhaustion="loop"), "on_exhaustion", "must be one of"),
    (lambda r: r.update(stages=[]), "stages", "at least one"),
    (lambda r: r.update(sedd=3), "sedd", "unknown recipe key"),
    (lambda r: r["stages"][1]["weights"].update(a=1), "stages[1].weights", "appears twice"),
    (lambda r: r["stages"][0]["weights"].update(a={"weight": 1, "children": {"b": 1}}),
     "stages[0].weights.a", "cannot have children"),
])
def test_errors_name_the_field(mutate, path, reason):
    r = base()
    mutate(r)
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(r, base_dir="/tmp")
    assert info.value.path == path, str(info.value)
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}: ")


def test_count_strings():
    r = Recipe.from_dict(base(stages=[{"name": "x", "tokens": "92.5B", "weights": {"a": 1}}]),
                         base_dir="/tmp")
    assert r.stages[0].tokens == 92_500_000_000


def test_load_recipe_reports_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("seq_length: 8\nsources: {a: x}\nstages: [{name: s, samples: 2, weights: {a: 0}}]\n")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.weights\.a: weight must be > 0.*r\.yaml"):
        load_recipe(p)


def test_syne_recipe_has_the_papers_numbers():
    r = load_recipe(REPO / "examples/recipes/syne_llama3_8b.yaml")
    assert r.seq_length == 8192
    s1, s2 = r.stages
    assert (s1.tokens, s2.tokens) == (92_500_000_000, 7_500_000_000)
    assert r.stage_num_samples() == [11_291_504, 915_528]
    w1 = dict(s1.leaf_items())
    w2 = dict(s2.leaf_items())
    zh = {"zh_web": 0.70, "zh_encyclopedia": 0.05, "zh_book": 0.20, "zh_qa_forum": 0.05}
    en = {"en_web": 0.40, "en_encyclopedia": 0.05, "en_book": 0.15, "en_qa_forum": 0.05,
          "en_paper": 0.10, "en_math": 0.10, "en_code": 0.15}
    # Web pages are split into one source per topic: their shares add up to the web share.
    for w in (w1, w2):
        for lang in ("zh", "en"):
            topics = [n for n in w if n.startswith(f"{lang}_web_")]
            assert len(topics) == 11 and len({w[t] for t in topics}) == 1  # equal to start
            w[f"{lang}_web"] = math.fsum(w.pop(t) for t in topics)
    for name, share in zh.items():
        assert math.isclose(w1[name], 0.2 * share) and math.isclose(w2[name], 0.1 * share)
    for name, share in en.items():
        assert math.isclose(w1[name], 0.8 * share) and math.isclose(w2[name], 0.7 * share)
    assert "synthetic_qa" not in w1 and math.isclose(w2["synthetic_qa"], 0.2)
    assert math.isclose(sum(w1.values()), 1.0) and math.isclose(sum(w2.values()), 1.0)
    web = [s for n, s in r.sources.items() if "_web_" in n]
    assert all(s.order == "ascending:ppl" and s.where[0][0] == "topic" for s in web)
    assert all(s.order == "shuffle" for n, s in r.sources.items() if "_web_" not in n)


def test_syne_run_configs_read_the_whole_recipe_and_no_more():
    """The trainer refuses train_steps x global_batch_size above the recipe's samples."""
    import yaml

    samples = load_recipe(REPO / "examples/recipes/syne_llama3_8b.yaml").num_samples
    for name in ("llama3_8b_stage1.yaml", "llama3_8b_stage2.yaml"):
        cfg = yaml.safe_load((REPO / "examples/syne" / name).read_text())
        assert cfg["train_steps"] == samples // cfg["global_batch_size"], name


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "tinyllama_surrogate.yaml"])
def test_other_example_recipes_load(name):
    r = load_recipe(REPO / "examples/recipes" / name)
    assert r.num_samples > 0
