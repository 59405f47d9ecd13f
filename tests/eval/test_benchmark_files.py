"""Benchmark files in their public formats: parsing, validation messages, task files, presets."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from megasyne.eval import benchmark_files as D
from megasyne.eval.tasks import (
    PAPER_PRESET,
    EvalConfigError,
    TaskSpec,
    build_lm_eval_configs,
    description,
    load_task_file,
    preset_tasks,
    select,
)


def test_fixture_loads_in_every_format(fixture_dir):
    mmlu = D.load_mmlu(fixture_dir / "mmlu", "test")
    assert sorted(mmlu) == ["astronomy", "college_computer_science"]
    q = mmlu["astronomy"][2]  # a quoted CSV field with a comma
    assert q["question"] == "Which of these is a star, not a planet?"
    assert q["choices"] == ["Venus", "Sirius", "Mars", "Saturn"] and q["answer"] == 1
    assert q["source"].endswith("astronomy_test.csv:3")
    ceval = D.load_ceval(fixture_dir / "ceval", "val")["high_school_physics"]
    assert [d["answer"] for d in ceval] == [1, 0, 2]
    assert D.load_ceval(fixture_dir / "ceval", "dev")["high_school_physics"][0]["choices"][0] == "3×10^8 m/s"
    cmmlu = D.load_cmmlu(fixture_dir / "cmmlu", "test")["astronomy"]
    assert cmmlu[0]["question"] == "地球绕太阳公转一周大约需要" and cmmlu[0]["answer"] == 3
    scieval, skipped = D.load_scieval(fixture_dir / "scieval", "valid")
    assert skipped == 1  # the 'filling' question
    judge = next(d for docs in scieval.values() for d in docs if d["labels"] == ["yes", "no", "maybe"])
    assert judge["answer"] == 0
    gsm = D.load_gsm8k(fixture_dir / "gsm8k", "test")["all"]
    assert [d["target"] for d in gsm] == ["1440", "9", "216", "21", "760"]
    assert D.load_gsm8k(fixture_dir / "gsm8k", "train")["all"][7]["target"] == "1000"  # "1,000"
    math = D.load_math(fixture_dir / "MATH", "train")["all"]
    assert [d["answer"] for d in math] == ["6", "15", "5", "5", "\\frac{3}{4}"]
    he = D.load_humaneval(fixture_dir / "humaneval" / "HumanEval.jsonl.gz")["all"]
    assert len(he) == 164 and he[0]["task_id"] == "HumanEval/0" and he[0]["entry_point"] == "has_close_elements"
    mbpp = {split: [d["task_id"] for d in D.load_mbpp(fixture_dir / "mbpp", split)["all"]]
            for split in ("prompt", "test", "train")}
    assert mbpp == {"prompt": [2, 3, 4, 1], "test": [11, 12, 13], "train": [601]}
    last = D.load_mbpp(fixture_dir / "mbpp", "test")["all"][-1]
    assert last["test_setup_code"].startswith("def is_leap(year):") and len(last["test_list"]) == 3
    assert last["source"].endswith("mbpp.jsonl:7") and last["id"] == "mbpp/13"


def _mmlu_copy(fixture_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "mmlu"
    shutil.copytree(fixture_dir / "mmlu", root)
    return root


def test_wrong_answer_letter_names_file_line_and_field(fixture_dir, tmp_path):
    root = _mmlu_copy(fixture_dir, tmp_path)
    path = root / "test" / "astronomy_test.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-1] + "E"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.EvalDataError) as err:
        D.load_mmlu(root, "test")
    assert f"{path}:2: field 'answer' is 'E', expected one of A, B, C, D" in str(err.value)


@pytest.mark.parametrize("case, expected", [
    ("mmlu_columns", "expected 6 columns (question,A,B,C,D,answer), got 5"),
    ("ceval_header", "C-Eval header lacks column(s) answer"),
    ("cmmlu_answer", "field 'Answer' is '2', expected one of A, B, C, D"),
    ("gsm8k_answer", "field 'answer' does not end with '#### <number>'"),
    ("gsm8k_json", "not valid JSON"),
    ("math_boxed", "field 'solution' has no \\boxed{...} final answer"),
    ("scieval_type", "field 'type' is 'essay'"),
    ("scieval_answer", "field 'answer' is ['E'], expected [one of A, B, C, D]"),
    ("humaneval_field", "field 'entry_point' is missing"),
    ("mbpp_tests", "field 'test_list' should be list, got str"),
    ("mbpp_task_id", "field 'task_id' should be int, got str"),
    ("mbpp_sanitized", "field 'prompt' is missing"),
    ("mbpp_duplicate", "task_id 11 again (first at "),
])
def test_malformed_files_fail_with_a_clear_message(tmp_path, case, expected):
    if case == "mmlu_columns":
        (tmp_path / "test").mkdir()
        (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,A\n")
        call, where = lambda: D.load_mmlu(tmp_path, "test"), "x_test.csv:1"
    elif case == "ceval_header":
        (tmp_path / "val").mkdir()
        (tmp_path / "val" / "x_val.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n")
        call, where = lambda: D.load_ceval(tmp_path, "val"), "x_val.csv:1"
    elif case == "cmmlu_answer":
        (tmp_path / "test").mkdir()
        (tmp_path / "test" / "x.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,2\n")
        call, where = lambda: D.load_cmmlu(tmp_path, "test"), "x.csv:3"
    elif case == "gsm8k_answer":
        (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "42"}) + "\n")
        call, where = lambda: D.load_gsm8k(tmp_path, "test"), "test.jsonl:1"
    elif case == "gsm8k_json":
        (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
        call, where = lambda: D.load_gsm8k(tmp_path, "test"), "test.jsonl:2"
    elif case == "math_boxed":
        (tmp_path / "test" / "algebra").mkdir(parents=True)
        (tmp_path / "test" / "algebra" / "1.json").write_text(json.dumps({"problem": "p", "solution": "x=2"}))
        call, where = lambda: D.load_math(tmp_path, "test"), "algebra/1.json"
    elif case in ("scieval_type", "scieval_answer"):
        rec = {"question": "q", "answer": ["A"], "type": "multiple-choice", "category": "physics",
               "ability": "Base Knowledge", "task_name": "t", "prompt": "p", "id": "1"}
        bad = dict(rec, type="essay") if case == "scieval_type" else dict(rec, answer=["E"])
        (tmp_path / "scieval-valid.json").write_text(json.dumps([rec, bad]))
        call, where = lambda: D.load_scieval(tmp_path, "valid"), "scieval-valid.json[1]"
    elif case.startswith("mbpp"):
        rec = {"task_id": 11, "text": "t", "code": "c", "test_list": ["assert True"],
               "test_setup_code": "", "challenge_test_list": []}
        if case == "mbpp_sanitized":
            good = {"task_id": 11, "prompt": "t", "code": "c", "test_imports": [],
                    "test_list": ["assert True"]}
            bad = {"task_id": 12, "code": "c", "test_list": ["assert True"]}
            (tmp_path / "sanitized-mbpp.json").write_text(json.dumps([good, bad]))
            call, where = lambda: D.load_mbpp(tmp_path, "test"), "sanitized-mbpp.json[1]"
        else:
            bad = dict(rec, task_id=12, test_list="assert True") if case == "mbpp_tests" else \
                dict(rec, task_id="12") if case == "mbpp_task_id" else rec
            (tmp_path / "mbpp.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(bad) + "\n")
            call, where = lambda: D.load_mbpp(tmp_path, "test"), "mbpp.jsonl:2"
    else:
        with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
            f.write(json.dumps({"task_id": "t", "prompt": "p", "test": "t"}) + "\n")
        call, where = lambda: D.load_humaneval(tmp_path), "HumanEval.jsonl.gz:1"
    with pytest.raises(D.EvalDataError) as err:
        call()
    assert where in str(err.value) and expected in str(err.value), str(err.value)


def test_missing_files_name_the_task_and_path(fixture_dir, tmp_path):
    spec = TaskSpec(name="mmlu_main", format="mmlu", path=tmp_path / "nowhere", num_fewshot=0)
    with pytest.raises(D.EvalDataError, match=r"task 'mmlu_main' \(mmlu\): .*nowhere does not exist"):
        build_lm_eval_configs(spec)
    root = _mmlu_copy(fixture_dir, tmp_path)
    shutil.rmtree(root / "dev")
    spec = TaskSpec(name="m", format="mmlu", path=root, num_fewshot=5)
    with pytest.raises(D.EvalDataError, match=r"mmlu split 'dev': .*dev does not exist"):
        build_lm_eval_configs(spec)
    spec = TaskSpec(name="g", format="gsm8k", path=fixture_dir / "gsm8k", split="validation")
    with pytest.raises(D.EvalDataError, match=r"gsm8k split 'validation': .*validation.jsonl does not exist"):
        build_lm_eval_configs(spec)


def test_too_few_fewshot_examples_is_an_error(fixture_dir):
    spec = TaskSpec(name="m", format="mmlu", path=fixture_dir / "mmlu", num_fewshot=6)
    with pytest.raises(EvalConfigError, match="6-shot needs 6 examples of 'astronomy' in split 'dev', found 5"):
        build_lm_eval_configs(spec)


def test_unknown_tasks_formats_and_fields(tmp_path):
    with pytest.raises(EvalConfigError, match=r"unknown task 'mmlu_pro' \(preset 'paper' has: mmlu, ceval"):
        preset_tasks("paper", tmp_path, ["mmlu", "mmlu_pro"])
    with pytest.raises(EvalConfigError, match="unknown preset 'llama'"):
        preset_tasks("llama", tmp_path)
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks:\n  - mmlu\n  - {name: arc, path: arc}\n")
    with pytest.raises(EvalConfigError, match=rf"{bad}: tasks\[1\] \(arc\): unknown task 'arc'"):
        load_task_file(bad)
    bad.write_text("tasks:\n  - {name: x, format: arc_easy, path: x}\n")
    with pytest.raises(EvalConfigError, match=r"tasks\[0\] \(x\): task 'x': unknown format 'arc_easy'"):
        load_task_file(bad)
    bad.write_text("tasks:\n  - {name: mmlu, shots: 5}\n")
    with pytest.raises(EvalConfigError, match=r"tasks\[0\] \(mmlu\): unknown field\(s\) shots"):
        load_task_file(bad)
    with pytest.raises(EvalConfigError, match="task file .*missing.yaml does not exist"):
        load_task_file(tmp_path / "missing.yaml")


def test_paper_preset_matches_the_paper(tmp_path):
    specs = {s.name: s for s in preset_tasks("paper", tmp_path)}
    shots = {n: s.num_fewshot for n, s in specs.items()}
    assert shots == {"mmlu": 5, "ceval": 5, "cmmlu": 5, "math": 5, "gsm8k": 8, "scieval": 5,
                     "humaneval": 0, "mbpp": 3}
    assert specs["mbpp"].eval_split == "test" and specs["mbpp"].fmt.fewshot_split == "prompt"
    assert specs["mmlu"].path == tmp_path / "mmlu" / "data" and specs["ceval"].eval_split == "val"
    assert set(specs) == set(PAPER_PRESET)


def test_task_file_resolves_paths_and_overrides_presets(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "data_root: bench\ntasks:\n  - mmlu\n  - {name: gsm8k, max_items: 7, max_new_tokens: 64}\n"
        "  - {name: mine, format: cmmlu, path: /abs/cmmlu, subjects: [astronomy]}\n")
    specs = load_task_file(tmp_path / "t.yaml")
    assert specs[0].path == tmp_path / "bench" / "mmlu" / "data" and specs[0].num_fewshot == 5
    assert (specs[1].num_fewshot, specs[1].max_items, specs[1].gen_tokens) == (8, 7, 64)
    assert specs[2].path == Path("/abs/cmmlu") and specs[2].subjects == ("astronomy",)


def test_select_is_round_robin_over_subjects():
    groups = {"b": [1, 2, 3], "a": [10, 20], "c": [100]}
    got = select(groups, 4)
    assert got == {"a": [10, 20], "b": [1], "c": [100]}
    assert select(groups, None) is groups and select(groups, 100) == {k: groups[k] for k in "abc"}


def test_prompts_are_lm_evals(fixture_dir):
    """Subject descriptions come from lm-eval's own task YAMLs (MMLU / C-Eval / CMMLU)."""
    assert description("mmlu", "college_computer_science") == \
        "The following are multiple choice questions (with answers) about college computer science.\n\n"
    assert description("ceval", "high_school_physics") == \
        "以下是中国关于高中物理的单项选择题，请选出其中的正确答案。\n\n"
    assert description("cmmlu", "astronomy") == "以下是关于天文学的单项选择题，请直接给出正确答案的选项。\n\n"
    assert description("mmlu", "my_subject").endswith("about my subject.\n\n")


def test_mbpp_prompt_is_lm_evals(fixture_dir):
    """Our template renders as lm-eval's mbpp.yaml (read from the installed lm-eval), and the
    few-shot examples are its tasks 2, 3, 4."""
    import re

    import jinja2
    import lm_eval.tasks
    import yaml

    from megasyne.eval.tasks import MBPP_TARGET, MBPP_TEXT

    folder = Path(lm_eval.tasks.__file__).parent / "mbpp"

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    ref = yaml.load((folder / "mbpp.yaml").read_text(), Loader=Loader)
    env = jinja2.Environment()
    for doc in D.load_mbpp(fixture_dir / "mbpp", "prompt")["all"][:3]:
        assert env.from_string(MBPP_TEXT).render(**doc) == \
            env.from_string(ref["doc_to_text"]).render(**doc)
        assert env.from_string(MBPP_TARGET).render(**doc) == \
            env.from_string(ref["doc_to_target"]).render(**doc, is_fewshot=True)
    assert ref["target_delimiter"] == "" and ref["generation_kwargs"]["until"] == ["[DONE]"]
    assert ref["num_fewshot"] == 3 and ref["fewshot_config"]["sampler"] == "first_n"
    shots = [int(x) for x in re.findall(r'"task_id": (\d+)', (folder / "utils.py").read_text())]
    assert tuple(shots) == D.MBPP_FEWSHOT_FIRST
