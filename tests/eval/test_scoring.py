"""Answer extraction (GSM8K, MATH) and HumanEval's and MBPP's unit tests in the sandbox."""

from __future__ import annotations

import pytest

from megasyne.eval import benchmark_files as D
from megasyne.eval import scoring as S


@pytest.mark.parametrize("generation, target, ok", [
    ("She has 5 + 4 = 9 balloons.\n#### 9", "9", True),
    ("#### 1,000 stamps", "1000", True),             # strict match, thousands separator
    ("The answer is $18.00.", "18", True),          # flexible: last number, $ and decimals
    ("3 apples plus 2 apples make 5", "5", True),
    ("#### 12\nWait, 13", "13", False),             # strict wins over later numbers
    ("I don't know", "7", False),
    ("-4 degrees", "-4", True),
])
def test_gsm8k_extraction_and_match(generation, target, ok):
    assert S.gsm8k_correct(S.extract_gsm8k(generation), target) is ok


@pytest.mark.parametrize("generation, answer, ok", [
    (" $\\frac{3}{4}$\n\n", "\\frac{3}{4}", True),
    (" 0.75", "\\frac{3}{4}", False),                # lm-eval's is_equiv is string-based
    (" $\\dfrac{1}{2}$", "\\frac12", True),           # dfrac / unbraced fraction normalised
    ("42", "42", True),
    (" x = 9", "9", False),
])
def test_math_answers_use_lm_evals_equivalence(generation, answer, ok):
    assert S.math_correct(S.extract_math(generation), answer) is ok


def test_boxed_answer_takes_the_last_box():
    assert D.boxed_answer("First \\boxed{1}, finally $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert D.boxed_answer("no box") is None


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail(fixture_dir):
    docs = D.load_humaneval(fixture_dir / "humaneval")["all"][:4]
    results = S.check_humaneval(docs, [d["canonical_solution"] for d in docs], timeout=20)
    assert [r.status for r in results] == ["passed"] * 4
    wrong = S.check_humaneval(docs[:2], ["    return None\n", "    return 1 +\n"], timeout=20)
    assert not any(r.passed for r in wrong)
    assert wrong[0].status.startswith("failed: AssertionError")
    assert "SyntaxError" in wrong[1].status


def test_completion_is_cut_at_the_first_stop_sequence(fixture_dir):
    doc = D.load_humaneval(fixture_dir / "humaneval")["all"][0]
    extra = "\n\ndef helper():\n    raise SystemExit(1)\n"
    assert S.truncate_completion(doc["canonical_solution"] + extra) == doc["canonical_solution"] + "\n"
    assert S.check_humaneval([doc], [doc["canonical_solution"] + extra])[0].passed


def test_sandbox_limits_time_memory_and_working_directory(tmp_path):
    assert S.run_program("while True:\n    pass\n", timeout=1).status == "timed out"
    res = S.run_program("x = bytearray(4 << 30)\n", timeout=10, memory_mb=512)
    assert not res.passed and "MemoryError" in res.status
    marker = tmp_path / "marker"
    res = S.run_program("import os\nopen('written', 'w').write('x')\nprint(os.getcwd())\n"
                        f"assert not os.path.exists({str(marker)!r})\n", timeout=10)
    assert res.passed  # it ran in its own empty temporary directory
    assert not (tmp_path / "written").exists()


def test_mbpp_programs_run_code_setup_and_asserts(fixture_dir):
    docs = D.load_mbpp(fixture_dir / "mbpp", "test")["all"]
    for doc in docs:  # canonical code, \r\n line ends as published
        assert S.run_program(S.mbpp_program(doc, doc["code"]), timeout=20).passed, doc["id"]
    leap = docs[-1]  # its code calls is_leap, which only the setup code defines
    assert "NameError" in S.run_program(S.mbpp_program(dict(leap, test_setup_code=""),
                                                       leap["code"]), timeout=20).status
    wrong = S.run_program(S.mbpp_program(docs[0], "def reverse_words(s):\n    return s\n"),
                          timeout=20)
    assert not wrong.passed and wrong.status.startswith("failed: AssertionError")
