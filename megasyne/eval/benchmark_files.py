"""Read benchmark files in their public formats, validated, as plain dicts ("docs").

Nothing is downloaded: the user fetches each benchmark once and points a task at it.

=========  ====================================================================  ============
format     files (as published)                                                  eval split
=========  ====================================================================  ============
mmlu       ``{dev,val,test}/<subject>_<split>.csv``, no header:                  test
           question, A, B, C, D, answer (hendrycks/test ``data/``)
ceval      ``{dev,val,test}/<subject>_<split>.csv``, header                      val
           ``id,question,A,B,C,D,answer[,explanation]`` (test has no answers)
cmmlu      ``{dev,test}/<subject>.csv``, header ``,Question,A,B,C,D,Answer``      test
scieval    ``scieval-dev.json`` + ``scieval-valid.json`` / ``scieval-test-local``  valid
           ``.json``: a JSON list of {question, answer: [..], type, category,
           ability, task_name, prompt, id}
gsm8k      ``train.jsonl`` / ``test.jsonl``: {question, answer: "... #### 42"}   test
math       ``{train,test}/<type>/<n>.json`` (Hendrycks MATH) or                  test
           ``{train,test}.jsonl``: {problem, solution (with \\boxed{}), level, type}
humaneval  ``HumanEval.jsonl[.gz]``: {task_id, prompt, canonical_solution,       (all)
           test, entry_point}
mbpp       ``mbpp.jsonl`` (the full set): {task_id, text, code, test_list,       test
           test_setup_code, challenge_test_list}, or ``sanitized-mbpp.json``: a
           JSON list of {task_id, prompt, code, test_imports, test_list}; splits
           by task_id: prompt 1-10, test 11-510, validation 511-600, train 601-974
=========  ====================================================================  ============

Every loader returns ``{group: [doc, ...]}`` (group = subject for the multiple-choice sets,
SciEval's few-shot group, or ``"all"``), docs in file order, each with a ``source`` field
``"path:line"``. A malformed file fails with :class:`EvalDataError` naming the file, the line
(or JSON index) and the field.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from megasyne.errors import EvalError
from megasyne.jsonl import read_jsonl

LETTERS = ("A", "B", "C", "D")


class EvalDataError(EvalError, ValueError):
    """A benchmark file is missing or malformed (the message names file, line and field)."""


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise EvalDataError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise EvalDataError(f"{what}: {path} is not a directory")
    return path


def _letter(value: str, where: str, field: str) -> int:
    v = (value or "").strip()
    if v not in LETTERS:
        raise EvalDataError(f"{where}: field '{field}' is {value!r}, expected one of A, B, C, D")
    return LETTERS.index(v)


def _csv_rows(path: Path):
    """Yield (line number where the record starts, row) of a UTF-8 (BOM tolerated) CSV."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        start = 1
        for row in reader:
            yield start, row
            start = reader.line_num + 1


# --------------------------------------------------------------------------- MMLU-style CSV

def _mc_doc(*, where: str, subject: str, qid: str, question: str, choices: list[str],
            answer: int) -> dict:
    if not question.strip():
        raise EvalDataError(f"{where}: field 'question' is empty")
    return dict(id=qid, subject=subject, question=question, choices=list(choices),
                answer=answer, source=where)


def _subject_files(root: Path, split: str, fmt: str) -> dict[str, Path]:
    """{subject: csv file} of one split directory."""
    split_dir = _require_dir(root / split, f"{fmt} split '{split}'")
    suffix = "" if fmt == "cmmlu" else f"_{split}"
    files = {}
    for p in sorted(split_dir.glob("*.csv")):
        if suffix and not p.stem.endswith(suffix):
            raise EvalDataError(f"{p}: {fmt} files are named <subject>{suffix}.csv")
        files[p.stem[: len(p.stem) - len(suffix)] if suffix else p.stem] = p
    if not files:
        raise EvalDataError(f"{fmt} split '{split}': no .csv files in {split_dir}")
    return files


def load_mmlu(root: str | Path, split: str) -> dict[str, list[dict]]:
    """MMLU (hendrycks/test ``data/``): headerless CSV rows question,A,B,C,D,answer."""
    out = {}
    for subject, path in _subject_files(Path(root), split, "mmlu").items():
        docs = []
        for line, row in _csv_rows(path):
            where = f"{path}:{line}"
            if len(row) != 6:
                raise EvalDataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), "
                                    f"got {len(row)}")
            docs.append(_mc_doc(where=where, subject=subject, qid=f"{subject}/{split}/{len(docs)}",
                                question=row[0], choices=row[1:5],
                                answer=_letter(row[5], where, "answer")))
        out[subject] = docs
    return out


def _header_csv(path: Path, need: tuple[str, ...], fmt: str):
    rows = _csv_rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise EvalDataError(f"{path}: empty file (expected a {fmt} header)") from None
    header = [h.strip() for h in header]
    missing = [c for c in need if c not in header]
    if missing:
        raise EvalDataError(f"{path}:1: {fmt} header lacks column(s) {', '.join(missing)} "
                            f"(found {', '.join(header) or 'nothing'})")
    for line, row in rows:
        if len(row) != len(header):
            raise EvalDataError(f"{path}:{line}: {len(row)} columns, header has {len(header)}")
        yield line, dict(zip(header, row))


def load_ceval(root: str | Path, split: str) -> dict[str, list[dict]]:
    """C-Eval: CSV with header id,question,A,B,C,D,answer (dev adds explanation)."""
    out = {}
    for subject, path in _subject_files(Path(root), split, "ceval").items():
        docs = []
        for line, rec in _header_csv(path, ("question", "A", "B", "C", "D", "answer"), "C-Eval"):
            where = f"{path}:{line}"
            docs.append(_mc_doc(where=where, subject=subject,
                                qid=f"{subject}/{split}/{rec.get('id', len(docs))}",
                                question=rec["question"], choices=[rec[k] for k in LETTERS],
                                answer=_letter(rec["answer"], where, "answer")))
        out[subject] = docs
    return out


def load_cmmlu(root: str | Path, split: str) -> dict[str, list[dict]]:
    """CMMLU: CSV with header ,Question,A,B,C,D,Answer."""
    out = {}
    for subject, path in _subject_files(Path(root), split, "cmmlu").items():
        docs = []
        for line, rec in _header_csv(path, ("Question", "A", "B", "C", "D", "Answer"), "CMMLU"):
            where = f"{path}:{line}"
            docs.append(_mc_doc(where=where, subject=subject, qid=f"{subject}/{split}/{len(docs)}",
                                question=rec["Question"], choices=[rec[k] for k in LETTERS],
                                answer=_letter(rec["Answer"], where, "Answer")))
        out[subject] = docs
    return out


# --------------------------------------------------------------------------- JSON helpers

def _field(rec: dict, key: str, where: str, kind=str):
    if key not in rec:
        raise EvalDataError(f"{where}: field '{key}' is missing")
    value = rec[key]
    if not isinstance(value, kind):
        raise EvalDataError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}, "
                            f"got {type(value).__name__}")
    return value


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{what}: {path} does not exist" if not path.exists()
                            else f"{what}: {path} is not a file")
    return path


# --------------------------------------------------------------------------- SciEval

SCIEVAL_LABELS = {"multiple-choice": ["A", "B", "C", "D"], "judge": ["yes", "no", "maybe"]}
SCIEVAL_FILES = {"dev": ["scieval-dev.json"],
                 "valid": ["scieval-valid.json"],
                 "test": ["scieval-test-local.json", "scieval-test.json"]}


def scieval_file(root: Path, split: str) -> Path:
    root = Path(root)
    if root.is_file():
        return root
    names = SCIEVAL_FILES.get(split, [f"scieval-{split}.json"])
    for name in names:
        if (root / name).is_file():
            return root / name
    raise EvalDataError(f"scieval split '{split}': none of {', '.join(names)} in {root}"
                        if root.is_dir() else f"scieval: {root} does not exist")


def load_scieval(root: str | Path, split: str) -> tuple[dict[str, list[dict]], int]:
    """SciEval JSON list; returns ({group: docs}, number of 'filling' questions skipped).

    Group = (task_name, ability, category, prompt), as SciEval's make_few_shot.py groups its
    dev examples. Multiple-choice answers are A-D, judge answers yes/no/maybe; 'filling'
    questions need free-form generation and are skipped (counted).
    """
    path = scieval_file(Path(root), split)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    out, skipped = {}, 0
    for i, rec in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(rec, dict):
            raise EvalDataError(f"{where}: expected a JSON object")
        qtype = _field(rec, "type", where)
        if qtype == "filling":
            skipped += 1
            continue
        if qtype not in SCIEVAL_LABELS:
            raise EvalDataError(f"{where}: field 'type' is {qtype!r}, expected multiple-choice, "
                                f"judge or filling")
        answer = _field(rec, "answer", where, list)
        labels = SCIEVAL_LABELS[qtype]
        if not answer or not isinstance(answer[0], str) or answer[0].strip() not in labels:
            raise EvalDataError(f"{where}: field 'answer' is {answer!r}, expected [one of "
                                f"{', '.join(labels)}] for a {qtype} question")
        group = "|".join(str(_field(rec, k, where)) for k in ("task_name", "ability", "category"))
        prompt = _field(rec, "prompt", where)
        doc = dict(id=str(rec.get("id", f"{split}/{i}")), subject=f"{group}|{prompt}",
                   question=_field(rec, "question", where), labels=labels,
                   answer=labels.index(answer[0].strip()), prompt=prompt, source=where)
        out.setdefault(doc["subject"], []).append(doc)
    return out, skipped


# --------------------------------------------------------------------------- GSM8K

_GSM_TARGET = re.compile(r"####\s*(.+?)\s*$")


def gsm8k_file(root: Path, split: str) -> Path:
    root = Path(root)
    return root if root.is_file() else _require_file(root / f"{split}.jsonl", f"gsm8k split '{split}'")


def load_gsm8k(root: str | Path, split: str) -> dict[str, list[dict]]:
    """GSM8K jsonl: {question, answer}; the answer's last line is ``#### <number>``."""
    path = gsm8k_file(Path(root), split)
    docs = []
    for line, rec in read_jsonl(path, EvalDataError):
        where = f"{path}:{line}"
        answer = _field(rec, "answer", where)
        m = _GSM_TARGET.search(answer.strip())
        if not m:
            raise EvalDataError(f"{where}: field 'answer' does not end with '#### <number>' "
                                f"(GSM8K format): {answer[-60:]!r}")
        docs.append(dict(id=f"{split}/{len(docs)}", question=_field(rec, "question", where),
                         answer=answer, target=m.group(1).replace(",", ""), source=where))
    if not docs:
        raise EvalDataError(f"{path}: no questions")
    return {"all": docs}


# --------------------------------------------------------------------------- MATH

def boxed_answer(solution: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in a MATH solution."""
    from lm_eval.tasks.hendrycks_math.utils import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(solution)
    if boxed is None:
        return None
    try:
        return remove_boxed(boxed)
    except AssertionError:
        return None


def load_math(root: str | Path, split: str) -> dict[str, list[dict]]:
    """Hendrycks MATH: ``<split>/<type>/<n>.json`` files or a ``<split>.jsonl`` file."""
    root = Path(root)
    if root.is_file():
        records = list(read_jsonl(root, EvalDataError))
        paths = [f"{root}:{line}" for line, _ in records]
    elif (root / f"{split}.jsonl").is_file():
        records = list(read_jsonl(root / f"{split}.jsonl", EvalDataError))
        paths = [f"{root / f'{split}.jsonl'}:{line}" for line, _ in records]
    else:
        split_dir = _require_dir(root / split, f"math split '{split}' (or {split}.jsonl)")
        files = sorted(split_dir.glob("*/*.json"), key=lambda p: (p.parent.name, _num(p.stem)))
        if not files:
            raise EvalDataError(f"math split '{split}': no <type>/<n>.json files in {split_dir}")
        records, paths = [], []
        for p in files:
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise EvalDataError(f"{p}: expected a JSON object")
            records.append((1, rec))
            paths.append(str(p))
    docs = []
    for where, (_, rec) in zip(paths, records):
        solution = _field(rec, "solution", where)
        answer = boxed_answer(solution)
        if answer is None:
            raise EvalDataError(f"{where}: field 'solution' has no \\boxed{{...}} final answer")
        docs.append(dict(id=f"{split}/{len(docs)}", problem=_field(rec, "problem", where),
                         solution=solution, answer=answer, level=str(rec.get("level", "")),
                         type=str(rec.get("type", "")), source=where))
    return {"all": docs}


def _num(stem: str):
    return (0, int(stem)) if stem.isdigit() else (1, stem)


# --------------------------------------------------------------------------- HumanEval

HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


def load_humaneval(root: str | Path, split: str | None = None) -> dict[str, list[dict]]:
    """HumanEval jsonl(.gz): {task_id, prompt, canonical_solution, test, entry_point}."""
    path = Path(root)
    if path.is_dir():
        found = [path / n for n in ("HumanEval.jsonl.gz", "HumanEval.jsonl") if (path / n).is_file()]
        if not found:
            raise EvalDataError(f"humaneval: no HumanEval.jsonl[.gz] in {path}")
        path = found[0]
    _require_file(path, "humaneval")
    docs = []
    for line, rec in read_jsonl(path, EvalDataError):
        where = f"{path}:{line}"
        doc = {k: _field(rec, k, where) for k in HUMANEVAL_FIELDS}
        doc.update(id=doc["task_id"], canonical_solution=str(rec.get("canonical_solution", "")),
                   source=where)
        docs.append(doc)
    if not docs:
        raise EvalDataError(f"{path}: no problems")
    return {"all": docs}


# --------------------------------------------------------------------------- MBPP

# The split of the MBPP paper (Austin et al. 2021) and of its published files, by task_id.
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600),
               "train": (601, 974)}
MBPP_FILES = ("mbpp.jsonl", "sanitized-mbpp.json")
MBPP_FEWSHOT_FIRST = (2, 3, 4)
"""The paper's 3-shot prompt (and lm-eval's ``mbpp`` task) uses tasks 2, 3, 4 as examples: the
``prompt`` split lists them first, then its other tasks in id order."""


def mbpp_file(root: Path) -> Path:
    root = Path(root)
    if root.is_file():
        return root
    for name in MBPP_FILES:
        if (root / name).is_file():
            return root / name
    raise EvalDataError(f"mbpp: none of {', '.join(MBPP_FILES)} in {root}" if root.is_dir()
                        else f"mbpp: {root} does not exist")


def _str_list(rec: dict, key: str, where: str, *, required: bool) -> list[str]:
    if key not in rec and not required:
        return []
    value = _field(rec, key, where, list)
    if (required and not value) or not all(isinstance(v, str) for v in value):
        raise EvalDataError(f"{where}: field '{key}' should be a {'non-empty ' if required else ''}"
                            f"list of strings (Python assert statements)")
    return value


def _mbpp_records(path: Path) -> list[tuple[str, dict]]:
    """[(where, record)] of the full jsonl or the sanitized JSON list."""
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        return [(f"{path}:{line}", rec) for line, rec in read_jsonl(path, EvalDataError)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a JSON list of problems (sanitized-mbpp.json), "
                            f"got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise EvalDataError(f"{path}[{i}]: expected a JSON object")
        out.append((f"{path}[{i}]", rec))
    return out


def load_mbpp(root: str | Path, split: str) -> dict[str, list[dict]]:
    """MBPP, full or sanitized; the split's problems by task_id (see MBPP_SPLITS)."""
    if split not in MBPP_SPLITS:
        raise EvalDataError(f"mbpp: unknown split '{split}' (MBPP has {', '.join(MBPP_SPLITS)})")
    path = mbpp_file(Path(root))
    sanitized = path.suffix == ".json"  # sanitized-mbpp.json: 'prompt' and 'test_imports'
    lo, hi = MBPP_SPLITS[split]
    docs, seen = [], {}
    for where, rec in _mbpp_records(path):
        task_id = _field(rec, "task_id", where, int)
        if task_id in seen:
            raise EvalDataError(f"{where}: task_id {task_id} again (first at {seen[task_id]})")
        seen[task_id] = where
        text = _field(rec, "prompt" if sanitized else "text", where)
        code = _field(rec, "code", where)
        tests = _str_list(rec, "test_list", where, required=True)
        if sanitized:
            setup = "\n".join(_str_list(rec, "test_imports", where, required=False))
        else:
            setup = _field(rec, "test_setup_code", where) if "test_setup_code" in rec else ""
        if lo <= task_id <= hi:
            docs.append(dict(id=f"mbpp/{task_id}", task_id=task_id, text=text, code=code,
                             test_list=tests, test_setup_code=setup,
                             challenge_test_list=_str_list(rec, "challenge_test_list", where,
                                                           required=False),
                             source=where))
    if not docs:
        raise EvalDataError(f"{path}: no problems with task_id {lo}-{hi} (MBPP's '{split}' split)")
    docs.sort(key=lambda d: d["task_id"])
    if split == "prompt":
        first = [d for i in MBPP_FEWSHOT_FIRST for d in docs if d["task_id"] == i]
        docs = first + [d for d in docs if d not in first]
    return {"all": docs}
