"""InTrainingEval: same questions and prompts as the offline runner, any score_fn, sharding."""

from __future__ import annotations

import pytest

from megasyne.eval.in_training import InTrainingEval, accuracies_from_counts
from megasyne.eval.lm import ScoreFnScorer
from megasyne.eval.runner import run_tasks
from megasyne.eval.tasks import EvalConfigError, load_task_file
from tests.eval.test_runner import fake_score_fn


@pytest.fixture(scope="module")
def mc_specs(fixture_tasks):
    return [s for s in load_task_file(fixture_tasks) if s.format in ("mmlu", "ceval", "cmmlu", "scieval")]


def test_accuracies_equal_the_offline_runner(mc_specs, smollm2_hf):
    import dataclasses

    import transformers

    calls = []

    def score_fn(sequences, starts):
        assert len(sequences) <= 3 and all(1 <= st < len(s) <= 513 for s, st in zip(sequences, starts))
        calls.append(len(sequences))
        return fake_score_fn(sequences, starts)

    evaluator = InTrainingEval(tasks=mc_specs, tokenizer_path=smollm2_hf, max_items=3,
                               max_length=512, batch_size=3)
    assert evaluator.num_questions == {"mmlu": 3, "ceval": 3, "cmmlu": 3, "scieval": 3}
    got = evaluator.run(score_fn)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    offline = run_tasks(ScoreFnScorer(fake_score_fn, tokenizer, max_length=512),
                        [dataclasses.replace(s, max_items=3) for s in mc_specs])
    assert got == {k: v["score"] for k, v in offline["tasks"].items()}
    assert sum(calls) == sum(len(i["logliks"]) for its in offline["items"].values() for i in its)
    # a second run gives the same answer (nothing is consumed)
    assert evaluator.run(fake_score_fn) == got


def test_data_parallel_shards_add_up(mc_specs, smollm2_hf):
    evaluator = InTrainingEval(tasks=mc_specs, tokenizer_path=smollm2_hf, max_items=3, max_length=512)
    full = evaluator.counts(fake_score_fn)
    parts = [evaluator.counts(fake_score_fn, shard=(i, 3)) for i in range(3)]
    summed = {k: tuple(sum(p[k][j] for p in parts) for j in range(2)) for k in full}
    assert summed == full and accuracies_from_counts(full) == evaluator.run(fake_score_fn)
    assert [sum(n for _, n in p.values()) for p in parts] == [4, 4, 4]
    with pytest.raises(ValueError, match="shard"):
        evaluator.counts(fake_score_fn, shard=(3, 3))


def test_everything_fails_at_construction(fixture_tasks, mc_specs, smollm2_hf, tmp_path):
    specs = load_task_file(fixture_tasks)
    with pytest.raises(EvalConfigError, match=r"task 'gsm8k' \(gsm8k\) is not multiple choice"):
        InTrainingEval(tasks=specs, tokenizer_path=smollm2_hf)
    with pytest.raises(EvalConfigError, match="tokenizer directory .*nowhere does not exist"):
        InTrainingEval(tasks=mc_specs, tokenizer_path=tmp_path / "nowhere")
    with pytest.raises(EvalConfigError, match="task file .*none.yaml does not exist"):
        InTrainingEval(tasks=tmp_path / "none.yaml", tokenizer_path=smollm2_hf)
    bad = tmp_path / "t.yaml"
    bad.write_text(f"tasks:\n  - {{name: m, format: mmlu, path: {tmp_path / 'mmlu'}}}\n")
    with pytest.raises(ValueError, match=r"task 'm' \(mmlu\): .*mmlu does not exist"):
        InTrainingEval(tasks=bad, tokenizer_path=smollm2_hf)
