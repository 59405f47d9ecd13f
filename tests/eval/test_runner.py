"""Runner, results files, paper-like tables, comparisons and the CLI's errors (no model)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import pytest

from megasyne.eval.lm import ScoreFnScorer, Scorer
from megasyne.eval.runner import (
    RESULTS_FORMAT,
    compare,
    format_table,
    read_results,
    run_tasks,
    write_results,
)
from megasyne.eval.tasks import EvalConfigError, load_task_file
from tests.launch import REPO_ROOT
from tests.scripts import run_tool


def fake_score_fn(sequences, starts):
    """Deterministic stand-in for a model: depends on every token, its position and the start."""
    return [-(sum((i + 1) * t for i, t in enumerate(s)) % 997) / 100.0 - (sum(s[st:]) % 7) / 10.0
            for s, st in zip(sequences, starts)]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_hf)


def test_multiple_choice_through_lm_eval(fixture_tasks, tokenizer):
    specs = [s for s in load_task_file(fixture_tasks) if s.format in ("mmlu", "ceval", "scieval")]
    scorer = ScoreFnScorer(fake_score_fn, tokenizer, max_length=1024)
    out = run_tasks(scorer, specs)
    assert {k: v["n"] for k, v in out["tasks"].items()} == {"mmlu": 2, "ceval": 2, "scieval": 2}
    assert out["tasks"]["scieval"]["skipped"] == 1
    for name, items in out["items"].items():
        for it in items:
            assert it["pred"] == max(range(len(it["logliks"])), key=it["logliks"].__getitem__)
            assert it["correct"] == (it["pred"] == it["target"])
            assert len(it["prompt_sha256"]) == 64
        assert out["tasks"][name]["score"] == sum(i["correct"] for i in items) / len(items)
    # the first MMLU question's answers, scored by hand: the continuation " A" .. " D"
    first = out["items"]["mmlu"][0]
    assert first["id"] == "astronomy/test/0" and len(first["logliks"]) == 4
    context = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
               "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\n"
               "Answer: B\n\nWhich planet is the largest in the Solar System?\nA. Earth\nB. Mars\n"
               "C. Jupiter\nD. Venus\nAnswer:")
    expected = []
    for letter in "ABCD":
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(context + " " + letter)["input_ids"][len(ctx):]
        expected.append(fake_score_fn([ctx + cont], [len(ctx)])[0])
    assert first["logliks"] == expected


def test_generation_needs_a_model_and_code_needs_opt_in(fixture_tasks, tokenizer):
    specs = {s.name: s for s in load_task_file(fixture_tasks)}
    scorer = ScoreFnScorer(fake_score_fn, tokenizer, max_length=256)
    with pytest.raises(NotImplementedError, match="ScoreFnScorer scores only"):
        run_tasks(scorer, [specs["gsm8k"]])
    with pytest.raises(EvalConfigError, match="task 'humaneval' executes model-written code"):
        run_tasks(scorer, [specs["humaneval"]])
    with pytest.raises(EvalConfigError, match="task 'mbpp' executes model-written code"):
        run_tasks(scorer, [specs["mbpp"]])


class CannedCoder(Scorer):
    """A 'model' that answers each MBPP prompt with the code given for the problem it ends with,
    and records what it was asked."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__(tokenizer, max_length=4096)
        self.answers, self.asked = answers, []

    def loglikelihood_tokens(self, requests):
        raise NotImplementedError

    def generate(self, prompt, *, max_new_tokens, stop):
        text = self.tokenizer.decode(prompt)
        self.asked.append((text, list(stop), max_new_tokens))
        return self.answers[re.findall(r"here is your task: (.*?) Your code should", text)[-1]]


def test_mbpp_through_the_runner(fixture_tasks, fixture_dir, tokenizer):
    """The fixture's MBPP task: canonical code passes every problem, wrong code fails every one;
    the 3-shot prompt is written out here from the raw file."""
    raw = {r["task_id"]: r for r in map(json.loads, (fixture_dir / "mbpp" / "mbpp.jsonl")
                                        .read_text().splitlines())}
    (spec,) = [s for s in load_task_file(fixture_tasks) if s.format == "mbpp"]
    spec = dataclasses.replace(spec, max_items=None)  # all three test problems

    def block(r):
        return ("You are an expert Python programmer, and here is your task: " + r["text"]
                + " Your code should pass these tests:\n\n" + "\n".join(r["test_list"])
                + "\n[BEGIN]\n")

    canonical = CannedCoder(tokenizer, {r["text"]: r["code"] for r in raw.values()})
    out = run_tasks(canonical, [spec], allow_code_execution=True)
    assert out["tasks"]["mbpp"]["score"] == 1.0 and out["tasks"]["mbpp"]["n"] == 3
    items = out["items"]["mbpp"]
    assert [i["id"] for i in items] == ["mbpp/11", "mbpp/12", "mbpp/13"]
    assert all(i["status"] == "passed" and i["correct"] for i in items)
    shots = "".join(block(raw[t]) + raw[t]["code"] + "\n[DONE]\n\n" for t in (2, 3, 4))
    assert canonical.asked[0] == (shots + block(raw[11]), ["[DONE]"], 32)

    wrong = CannedCoder(tokenizer, {r["text"]: "def nothing():\n    return None" for r in raw.values()})
    wrong.answers[raw[12]["text"]] = "def second_largest(nums):\n    return max(nums)"
    out = run_tasks(wrong, [spec], allow_code_execution=True)
    assert out["tasks"]["mbpp"]["score"] == 0.0
    assert [i["status"].split(":")[:2] for i in out["items"]["mbpp"]] == [
        ["failed", " NameError"], ["failed", " AssertionError"], ["failed", " NameError"]]


def _results(name, scores, n=10, shots=5, items=None):
    tasks = {t: {"format": t, "split": "test", "num_fewshot": shots, "n": n, "score": s}
             for t, s in scores.items()}
    return {"format": RESULTS_FORMAT, "name": name, "tasks": tasks, "items": items or {}}


def test_results_file_is_written_atomically(tmp_path):
    path = tmp_path / "out" / "run.json"
    doc = _results("base", {"mmlu": 0.5})
    write_results(doc, path)
    assert read_results(path) == doc
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]  # no temp file left
    with pytest.raises(TypeError):  # a failed write leaves the old file and no partial file
        write_results({**doc, "bad": object()}, path)
    assert read_results(path) == doc and len(list(path.parent.iterdir())) == 1
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(EvalConfigError, match="not a megasyne results file"):
        read_results(tmp_path / "other.json")
    with pytest.raises(EvalConfigError, match="results file .*nope.json does not exist"):
        read_results(tmp_path / "nope.json")


def test_paper_table_and_comparison():
    base = _results("Llama-3-8B", {"gsm8k": 0.5, "mmlu": 0.666, "ceval": 0.4943},
                    items={"mmlu": [{"id": i, "correct": i < 6} for i in range(10)]})
    syne = _results("Llama-3-SynE", {"mmlu": 0.6519, "ceval": 0.5824, "humaneval": 0.3},
                    items={"mmlu": [{"id": i, "correct": 1 <= i < 8} for i in range(10)]})
    table = format_table([base, syne]).splitlines()
    assert table[0].split("|")[1:-1] == [" Model        ", " MMLU  ", " C-Eval ", " GSM8K ", " HumanEval "]
    assert table[2].split("|")[2:-1] == [" 66.60 ", " 49.43  ", " 50.00 ", " -         "]
    text, rows = compare(base, syne)
    mmlu = next(r for r in rows if r["task"] == "mmlu")
    assert round(mmlu["delta_points"], 2) == -1.41 and (mmlu["gained"], mmlu["lost"]) == (2, 1)
    assert "+8.81" in text and "only in one run" in text
    other = _results("x", {"mmlu": 0.7}, shots=0)
    assert "not comparable: num_fewshot 5 vs 0" in compare(base, other)[0]


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("megasyne_evaluate_tool", REPO_ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors_name_what_is_wrong(tmp_path, fixture_tasks, capsys):
    tool = _evaluate_module()
    out = ["--output", str(tmp_path / "r.json")]
    cases = [
        (["run", "--hf-dir", str(tmp_path), "--task-file", str(tmp_path / "none.yaml"), *out],
         f"task file {tmp_path / 'none.yaml'} does not exist"),
        (["run", "--hf-dir", str(tmp_path), "--preset", "paper", "--data-root", str(tmp_path),
          "--tasks", "mmlu,mmlu_pro", *out], "unknown task 'mmlu_pro' (preset 'paper' has: mmlu"),
        (["run", "--hf-dir", str(tmp_path), "--task-file", str(fixture_tasks), "--tasks", "arc", *out],
         "unknown task 'arc'"),
        (["run", "--hf-dir", str(tmp_path), "--task-file", str(fixture_tasks), *out],
         f"--hf-dir {tmp_path}: no config.json there"),
        (["run", "--checkpoint", str(tmp_path / "ckpt"), "--task-file", str(fixture_tasks), *out],
         str(tmp_path / "ckpt")),
        (["table", str(tmp_path / "missing.json")], "missing.json does not exist"),
    ]
    for argv, message in cases:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "r.json").exists()


def test_cli_table_and_compare(tmp_path):
    write_results(_results("base", {"mmlu": 0.25, "gsm8k": 0.1}), tmp_path / "a.json")
    write_results(_results("cpt", {"mmlu": 0.5, "gsm8k": 0.1}), tmp_path / "b.json")
    proc = run_tool("tools/evaluate.py", "compare", tmp_path / "a.json", tmp_path / "b.json")
    assert "| MMLU      | 25.00 | 50.00 | +25.00" in proc.stdout
    proc = run_tool("tools/evaluate.py", "table", tmp_path / "a.json", tmp_path / "nope.json", check=False)
    assert proc.returncode == 2 and "nope.json does not exist" in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr

