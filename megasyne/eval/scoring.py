"""Scoring of generated answers: GSM8K numbers, MATH expressions, HumanEval and MBPP programs.

- GSM8K: lm-eval's two extractions: "strict" takes the number after ``####``; when the
  generation has none, "flexible" takes the last number in it. Numbers compare as decimals
  ("18", "18.0", "$18" and "1,8" -> "18" ... are equal when their values are).
- MATH: lm-eval's hendrycks_math scoring (text between the first and last ``$`` if any, then
  its ``is_equiv`` normalisation) against the solution's last ``\\boxed{}``.
- HumanEval: the program ``prompt + completion + test + check(entry_point)`` runs in a child
  Python process (isolated mode ``-I``, empty temporary working directory, minimal environment,
  no stdin, CPU / memory / file-size limits, killed with its process group at the timeout).
  This contains accidents of model-written code (infinite loops, huge allocations, stray
  files); it is not a security boundary against hostile code: run untrusted models' code
  in a container or VM.
- MBPP: the program ``completion + test_setup_code + test_list`` (the asserts), run the same way;
  the completion is the generation up to ``[DONE]`` (lm-eval's ``mbpp``: no other cut).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# --------------------------------------------------------------------------- GSM8K

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")            # lm-eval gsm8k "strict-match"
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")     # lm-eval gsm8k "flexible-extract"


def extract_gsm8k(text: str) -> str | None:
    """The predicted final number of a GSM8K generation (None when it has no number)."""
    m = _STRICT.search(text)
    if m:
        return m.group(1)
    found = [a or b for a, b in _FLEXIBLE.findall(text)]
    found = [f for f in found if re.search(r"[0-9]", f)]
    return found[-1] if found else None


def _number(text: str) -> Decimal | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def gsm8k_correct(prediction: str | None, target: str) -> bool:
    """Exact match of the extracted number with the reference (as decimals)."""
    if prediction is None:
        return False
    a, b = _number(prediction), _number(target)
    if a is None or b is None:
        return prediction.strip() == target.strip()
    return a == b


# --------------------------------------------------------------------------- MATH

def extract_math(text: str) -> str:
    """lm-eval hendrycks_math: the text between the first and last '$', else all of it."""
    dollars = [i for i, ch in enumerate(text) if ch == "$"]
    return text if len(dollars) <= 1 else text[dollars[0] + 1: dollars[-1]]


def math_correct(prediction: str, answer: str) -> bool:
    from lm_eval.tasks.hendrycks_math.utils import is_equiv

    return bool(is_equiv(prediction, answer))


# --------------------------------------------------------------------------- HumanEval

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Codex paper's stop sequences


@dataclass(kw_only=True, frozen=True)
class ExecResult:
    """Outcome of one program run in the sandbox."""

    passed: bool
    """The program exited with status 0 within the time limit."""
    status: str
    """"passed", "timed out", or "failed: <last line of stderr>"."""


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply():  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(program: str, *, timeout: float = 10.0, memory_mb: int = 2048) -> ExecResult:
    """Run Python source in a child process with limits; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="megasyne-exec-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", path], cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_limits(memory_mb << 20, int(timeout) + 1) if os.name == "posix" else None)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return ExecResult(passed=False, status="timed out")
    if proc.returncode == 0:
        return ExecResult(passed=True, status="passed")
    if proc.returncode < 0 and -proc.returncode in (signal.SIGXCPU, signal.SIGKILL):
        return ExecResult(passed=False, status="timed out")
    lines = [ln for ln in err.decode("utf-8", "replace").strip().splitlines() if ln.strip()]
    return ExecResult(passed=False, status=f"failed: {lines[-1][:200] if lines else f'exit {proc.returncode}'}")


def humaneval_program(doc: dict, completion: str) -> str:
    """The check program of HumanEval's reference harness."""
    return (doc["prompt"] + completion + "\n\n" + doc["test"] + "\n\n"
            + f"check({doc['entry_point']})\n")


def truncate_completion(text: str, stop: list[str] = HUMANEVAL_STOP) -> str:
    """Cut a completion at the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def check_humaneval(docs: list[dict], completions: list[str], *, timeout: float = 10.0,
                    workers: int | None = None) -> list[ExecResult]:
    """Run every (doc, completion) program, ``workers`` at a time (default: CPU count)."""
    workers = workers or max(1, os.cpu_count() or 1)
    programs = [humaneval_program(d, truncate_completion(c)) for d, c in zip(docs, completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout=timeout), programs))


# --------------------------------------------------------------------------- MBPP

MBPP_STOP = ["[DONE]"]


def mbpp_program(doc: dict, completion: str) -> str:
    """The generated code, then the problem's setup code, then its assert statements."""
    parts = [completion, doc.get("test_setup_code") or "", *doc["test_list"]]
    return "\n".join(parts) + "\n"
