"""Answer parsing and the filters every synthetic QA pair goes through, in this order::

    parse        "Problem: ... Solution: ..." (also Question/Answer, markdown bold or headings,
                 Chinese 问题/题目 + 解答/答案); a second "Problem:" ends the solution
    validate     placeholders left from the template, language, lengths, problem copied from seed
    code         code disciplines: the solution's first fenced code block, which must compile
    contaminate  any n-gram (13 words / 20 Chinese characters) shared with a benchmark file
    near-dup     MinHash LSH over word 5-gram shingles (character 5-grams for Chinese), datasketch,
                 against every pair kept so far (this run and earlier ones)

Each filter returns the reason a pair is dropped (or None); the run report counts every reason.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from megasyne.errors import RecipeToolError

_P_LABEL = r"(?:problem|question|exercise|问题|题目)"
_S_LABEL = r"(?:solution|answer|worked solution|解答|答案|解析|解)"
# A label starts a line (after optional '>', '#' heading marks, '**'), may carry a number, and
# ends with a colon or the end of the line (a heading): "**Problem 1:**", "### Solution", "解答："
_LABEL = (r"^[ \t>]*(?:#{{1,6}}[ \t]*)?(?:\*\*|__)?[ \t]*{}(?:[ \t]*\d+)?[ \t]*(?:\*\*|__)?"
          r"[ \t]*(?:[:：]|(?=\n))[ \t]*(?:\*\*|__)?")
PROBLEM_RE = re.compile(_LABEL.format(_P_LABEL), re.IGNORECASE | re.MULTILINE)
SOLUTION_RE = re.compile(_LABEL.format(_S_LABEL), re.IGNORECASE | re.MULTILINE)
PLACEHOLDER_RE = re.compile(r"<\s*(?:the )?(?:problem|solution|step-by-step solution)\s*>|<题目>|<分步解答>|"
                            r"\[(?:the )?(?:problem description|solution)\]", re.IGNORECASE)
CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_RE = re.compile(r"[A-Za-z]")


class SynthError(RecipeToolError, ValueError):
    """Bad input or a resume that does not match (the message names the file/option)."""


@dataclass(kw_only=True, frozen=True)
class QAPair:
    problem: str
    solution: str


def parse_qa(text: str) -> tuple[QAPair | None, str | None]:
    """(pair, None) or (None, reason) with reason ``no_problem`` / ``no_solution``."""
    p = PROBLEM_RE.search(text)
    if p is None:
        return None, "no_problem"
    s = SOLUTION_RE.search(text, p.end())
    if s is None:
        return None, "no_solution"
    nxt = PROBLEM_RE.search(text, s.end())  # the model went on with another problem: cut there
    problem = text[p.end():s.start()].strip().strip("*_ ").strip()
    solution = text[s.end():nxt.start() if nxt else len(text)].strip().strip("*_ ").strip()
    if not problem:
        return None, "no_problem"
    if not solution:
        return None, "no_solution"
    return QAPair(problem=problem, solution=solution), None


def language_ok(text: str, lang: str) -> bool:
    """en: mostly Latin letters, almost no CJK; zh: CJK at least 30% of letters + CJK."""
    cjk, latin = len(CJK_RE.findall(text)), len(LATIN_RE.findall(text))
    if cjk + latin == 0:
        return False
    if lang == "zh":
        return cjk / (cjk + latin) >= 0.3
    return cjk / (cjk + latin) < 0.05


class _SeparatorsToSpace(dict):
    """str.translate table: punctuation, symbols, separators, controls -> space; filled per
    character on first sight (a per-character category lookup was most of the filters' time)."""

    def __missing__(self, code: int) -> str:
        c = chr(code)
        self[code] = " " if unicodedata.category(c)[0] in "PSZC" else c
        return self[code]


_TO_SPACE = _SeparatorsToSpace()


def normalise(text: str) -> str:
    """Lowercase, NFKC, punctuation -> space, whitespace collapsed (for overlap checks)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_TO_SPACE)
    return " ".join(text.split())


def units(text: str) -> list[str]:
    """Comparison units: words, with every CJK character a unit of its own."""
    out = []
    for w in normalise(text).split():
        if CJK_RE.search(w):
            buf = ""
            for c in w:
                if CJK_RE.match(c):
                    if buf:
                        out.append(buf)
                        buf = ""
                    out.append(c)
                else:
                    buf += c
            if buf:
                out.append(buf)
        else:
            out.append(w)
    return out


def ngrams(seq: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def copied_from_seed(problem: str, seed: str, n: int = 8, threshold: float = 0.5) -> bool:
    """The problem's n-grams are mostly found in the seed snippet (restated, not created)."""
    p = units(problem)
    grams = ngrams(p, n) if len(p) >= n else {tuple(p)}
    if not grams or not p:
        return False
    seed_grams = ngrams(units(seed), min(n, len(p)))
    return sum(g in seed_grams for g in grams) / len(grams) >= threshold


def validate(pair: QAPair, *, lang: str, seed: str, limits: dict,
             kind: str = "qa") -> str | None:
    """The first reason to drop a parsed pair, or None (checked in this order). A code
    solution is mostly code: only its problem is checked for the language."""
    if PLACEHOLDER_RE.search(pair.problem) or PLACEHOLDER_RE.search(pair.solution):
        return "template_placeholder"
    if not (language_ok(pair.problem, lang) and (kind == "code" or language_ok(pair.solution, lang))):
        return "wrong_language"
    for part in ("problem", "solution"):
        n = len(getattr(pair, part))
        if n < limits.get(f"min_{part}_chars", 0):
            return f"{part}_too_short"
        if n > limits.get(f"max_{part}_chars", 1 << 30):
            return f"{part}_too_long"
    if copied_from_seed(pair.problem, seed):
        return "copied_seed"
    return None


CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.IGNORECASE | re.DOTALL)


def parse_code(solution: str) -> tuple[str | None, str | None]:
    """(code, None) from the first fenced code block of a solution, or (None, reason): ``no_code``
    (no fenced block, or an empty one) or ``code_syntax_error`` (it does not compile)."""
    m = CODE_BLOCK_RE.search(solution)
    if m is None or not m.group(1).strip():
        return None, "no_code"
    code = m.group(1).rstrip() + "\n"
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return None, "code_syntax_error"
    return code, None


class NearDuplicates:
    """MinHash LSH (datasketch) over 5-unit shingles; ``seen(key, text)`` adds and answers."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._first = MinHash(num_perm=num_perm, seed=1)  # its permutations are reused
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.shingle = num_perm, shingle
        self._last: tuple[str, object] | None = None

    def _signature(self, text: str):
        if self._last is not None and self._last[0] == text:  # duplicate_of, then add
            return self._last[1]
        u = units(text)
        grams = ngrams(u, self.shingle) if len(u) >= self.shingle else {tuple(u)}
        # the permutations of seed 1, not drawn again for every text (a third of the time)
        m = self._minhash(num_perm=self.num_perm, seed=1, scheme=self._first.scheme,
                          permutations=self._first.permutations)
        m.update_batch([" ".join(g).encode("utf-8") for g in grams])
        self._last = (text, m)
        return m

    def duplicate_of(self, text: str) -> str | None:
        hits = self.lsh.query(self._signature(text))
        return sorted(hits)[0] if hits else None

    def add(self, key: str, text: str) -> None:
        self.lsh.insert(key, self._signature(text))


def _strings(value, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def _pick(record, fields: tuple[str, ...] | None):
    """The record itself, or only its values under ``fields`` (records that are objects)."""
    if not fields:
        return record
    if isinstance(record, list):
        return [_pick(r, fields) for r in record]
    if isinstance(record, dict):
        return [record[k] for k in fields if k in record]
    return record


def read_benchmark_texts(path: str | Path, fields: tuple[str, ...] | None = None) -> list[str]:
    """Every string in a benchmark file: .jsonl / .json (any nesting) / .txt, optionally .gz.
    With ``fields``, only the strings under those keys of each JSON record (e.g. HumanEval's
    ``prompt``, MBPP's ``text``: its reference code and tests would match common code)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.with_suffix("") if path.suffix == ".gz" else path
    texts: list[str] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            _strings(_pick(json.loads(line), fields), texts)
                        except json.JSONDecodeError as exc:
                            raise SynthError(f"benchmark file {path}:{n}: not JSON ({exc})") \
                                from None
            elif stem.suffix == ".json":
                try:
                    _strings(_pick(json.load(f), fields), texts)
                except json.JSONDecodeError as exc:
                    raise SynthError(f"benchmark file {path}: not JSON ({exc})") from None
            else:
                texts.extend(line for line in f.read().split("\n\n") if line.strip())
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SynthError(f"benchmark file {path}: cannot read it ({exc}); check --benchmark") \
            from None
    return texts


class Contamination:
    """n-gram index of benchmark texts. Latin text: ``n`` words; a CJK character counts as a unit
    and CJK-heavy items use ``n_cjk`` units. Items shorter than that (but at least ``min_units``)
    are matched whole. ``match(text)`` names the benchmark file of the first overlap."""

    def __init__(self, files: list[str], *, n: int = 13, n_cjk: int = 20, min_units: int = 8,
                 fields: tuple[str, ...] | None = None) -> None:
        self.n, self.n_cjk, self.min_units = n, n_cjk, min_units
        self.grams: dict[int, dict[str, str]] = {}  # length -> {hash -> file}
        self.files, self.items = list(files), 0
        for path in self.files:
            for text in read_benchmark_texts(path, fields):
                u = units(text)
                k = self._k(text)
                if len(u) >= k:
                    for g in ngrams(u, k):
                        self.grams.setdefault(k, {}).setdefault(self._h(g), str(path))
                elif len(u) >= min_units:
                    self.grams.setdefault(len(u), {}).setdefault(self._h(tuple(u)), str(path))
                self.items += 1

    def _k(self, text: str) -> int:
        return self.n_cjk if len(CJK_RE.findall(text)) > len(LATIN_RE.findall(text)) else self.n

    @staticmethod
    def _h(gram) -> str:
        return hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=12).hexdigest()

    def match(self, text: str) -> str | None:
        u = units(text)
        for k, table in self.grams.items():
            for g in ngrams(u, k):
                hit = table.get(self._h(g))
                if hit:
                    return hit
        return None


__all__ = ["Contamination", "NearDuplicates", "QAPair", "SynthError", "copied_from_seed",
           "language_ok", "ngrams", "normalise", "parse_code", "parse_qa", "read_benchmark_texts",
           "units", "validate"]
