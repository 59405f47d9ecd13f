"""Evaluation tasks: what to read, how many shots, and the lm-eval task configs they become.

A :class:`TaskSpec` names a benchmark format (``mmlu``, ``ceval``, ``cmmlu``, ``scieval``,
``gsm8k``, ``math``, ``humaneval``, ``mbpp``) and a local path. :func:`build_lm_eval_configs` reads the
files (``megasyne.eval.benchmark_files``, validated) and turns every subject into an lm-eval task config
whose dataset is the already-parsed docs (``custom_dataset``); lm-eval then builds the
prompts and scores them. Prompts are lm-eval's own for its mmlu / ceval-valid / cmmlu /
gsm8k / hendrycks_math tasks (subject descriptions are read from the task YAMLs lm-eval
ships); SciEval's is SciEval's ``make_few_shot.py``; HumanEval's is the bare prompt; MBPP's is
lm-eval's ``mbpp`` task (the MBPP paper's: "You are an expert Python programmer, and here is
your task: ... Your code should pass these tests: ... [BEGIN]", examples closed by ``[DONE]``).

Paper settings (Llama-3-SynE; ``PAPER_PRESET``): 5-shot MMLU, C-Eval, CMMLU, MATH, SciEval;
8-shot GSM8K; 0-shot HumanEval and 3-shot MBPP (greedy pass@1).

A task file (YAML)::

    data_root: /data/benchmarks          # relative paths resolve here (default: the file's dir)
    tasks:
      - mmlu                             # a preset task, path under data_root
      - {name: ceval, max_items: 200}    # a preset task with overrides
      - {name: my_mmlu, format: mmlu, path: mmlu_subset/, num_fewshot: 0}
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megasyne.errors import EvalError
from megasyne.eval import benchmark_files as D
from megasyne.eval import scoring

MC, GEN, CODE = "multiple_choice", "generate", "code"


@dataclass(kw_only=True, frozen=True)
class Format:
    """How one public benchmark format is read and scored."""

    kind: str
    """MC (answer log-likelihood), GEN (greedy generation + exact match) or CODE (unit tests)."""
    split: str | None
    """Default evaluation split."""
    fewshot_split: str | None
    """Split the few-shot examples come from (the first ones, in file order)."""
    metric: str
    """Name of the reported metric."""
    max_new_tokens: int = 0
    """Default generation budget (GEN / CODE)."""


FORMATS: dict[str, Format] = {
    "mmlu": Format(kind=MC, split="test", fewshot_split="dev", metric="acc"),
    "ceval": Format(kind=MC, split="val", fewshot_split="dev", metric="acc"),
    "cmmlu": Format(kind=MC, split="test", fewshot_split="dev", metric="acc"),
    "scieval": Format(kind=MC, split="valid", fewshot_split="dev", metric="acc"),
    "gsm8k": Format(kind=GEN, split="test", fewshot_split="train", metric="exact_match",
                    max_new_tokens=256),
    "math": Format(kind=GEN, split="test", fewshot_split="train", metric="exact_match",
                   max_new_tokens=512),
    "humaneval": Format(kind=CODE, split=None, fewshot_split=None, metric="pass@1",
                        max_new_tokens=512),
    "mbpp": Format(kind=CODE, split="test", fewshot_split="prompt", metric="pass@1",
                   max_new_tokens=512),
}


class EvalConfigError(EvalError, ValueError):
    """A task specification is invalid (the message names the file / task / field)."""


@dataclass(kw_only=True, frozen=True)
class TaskSpec:
    """One benchmark to evaluate."""

    name: str
    """Name in results and tables (unique in a run)."""
    format: str
    """One of FORMATS."""
    path: Path
    """Benchmark directory or file, in the format's public layout (see megasyne.eval.benchmark_files)."""
    num_fewshot: int = 0
    """Number of in-context examples (the first ones of the few-shot split)."""
    split: str | None = None
    """Evaluation split (default: the format's)."""
    fewshot_split: str | None = None
    """Split of the few-shot examples (default: the format's)."""
    max_items: int | None = None
    """Evaluate at most this many questions, taken round-robin over subjects (None: all)."""
    max_new_tokens: int | None = None
    """Generation budget for GEN / CODE tasks (default: the format's)."""
    subjects: tuple[str, ...] | None = None
    """Only these subjects (MMLU-style file stems / SciEval groups); None: all."""
    timeout: float = 10.0
    """HumanEval, MBPP: seconds per program."""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise EvalConfigError(f"task '{self.name}': unknown format '{self.format}' "
                                  f"(known: {', '.join(FORMATS)})")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise EvalConfigError(f"task '{self.name}': names use letters, digits, _ . - only")
        if self.num_fewshot < 0 or (self.max_items is not None and self.max_items < 1):
            raise EvalConfigError(f"task '{self.name}': num_fewshot must be >= 0 and "
                                  f"max_items >= 1")
        if self.format == "humaneval" and self.num_fewshot:
            raise EvalConfigError(f"task '{self.name}': humaneval is 0-shot")

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def eval_split(self) -> str | None:
        return self.split or self.fmt.split

    @property
    def gen_tokens(self) -> int:
        return self.max_new_tokens or self.fmt.max_new_tokens


# Paths are relative to --data-root; the layout each benchmark has once downloaded.
PAPER_PRESET: dict[str, dict[str, Any]] = {
    "mmlu": dict(format="mmlu", path="mmlu/data", num_fewshot=5),
    "ceval": dict(format="ceval", path="ceval", num_fewshot=5),
    "cmmlu": dict(format="cmmlu", path="cmmlu", num_fewshot=5),
    "math": dict(format="math", path="MATH", num_fewshot=5),
    "gsm8k": dict(format="gsm8k", path="gsm8k", num_fewshot=8),
    "scieval": dict(format="scieval", path="scieval", num_fewshot=5),
    "humaneval": dict(format="humaneval", path="humaneval/HumanEval.jsonl.gz", num_fewshot=0),
    "mbpp": dict(format="mbpp", path="mbpp", num_fewshot=3),
}
PRESETS = {"paper": PAPER_PRESET}
_SPEC_FIELDS = {f.name for f in dataclasses.fields(TaskSpec)}


def _make_spec(entry: dict, where: str, root: Path) -> TaskSpec:
    unknown = set(entry) - _SPEC_FIELDS
    if unknown:
        raise EvalConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(_SPEC_FIELDS))})")
    if "name" not in entry:
        raise EvalConfigError(f"{where}: field 'name' is missing")
    merged = dict(PAPER_PRESET.get(entry["name"], {}), **entry)
    if "format" not in merged:
        raise EvalConfigError(f"{where}: unknown task '{entry['name']}' (preset tasks: "
                              f"{', '.join(PAPER_PRESET)}); a new task needs 'format' and 'path'")
    if "path" not in merged:
        raise EvalConfigError(f"{where}: field 'path' is missing")
    path = Path(merged["path"]).expanduser()
    merged["path"] = path if path.is_absolute() else root / path
    if merged.get("subjects") is not None:
        merged["subjects"] = tuple(merged["subjects"])
    try:
        return TaskSpec(**merged)
    except EvalConfigError as exc:
        raise EvalConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise EvalConfigError(f"{where}: {exc}") from None


def preset_tasks(preset: str, data_root: str | Path, names: list[str] | None = None,
                 **overrides) -> list[TaskSpec]:
    """The preset's tasks (all, or ``names`` in that order), paths under ``data_root``."""
    if preset not in PRESETS:
        raise EvalConfigError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    table = PRESETS[preset]
    names = names or list(table)
    for n in names:
        if n not in table:
            raise EvalConfigError(f"unknown task '{n}' (preset '{preset}' has: {', '.join(table)})")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return [_make_spec(dict(name=n, **overrides), f"preset {preset}", Path(data_root)) for n in names]


def load_task_file(path: str | Path, data_root: str | Path | None = None) -> list[TaskSpec]:
    """Read a task file (see the module docstring); errors name the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise EvalConfigError(f"task file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EvalConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise EvalConfigError(f"{path}: expected a mapping with a non-empty 'tasks' list")
    root = Path(data_root or doc.get("data_root") or ".").expanduser()
    root = root if root.is_absolute() else path.parent / root
    specs = []
    for i, entry in enumerate(doc["tasks"]):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise EvalConfigError(f"{path}: tasks[{i}]: expected a task name or a mapping")
        specs.append(_make_spec(entry, f"{path}: tasks[{i}] ({entry.get('name', '?')})", root))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalConfigError(f"{path}: task name(s) {', '.join(dup)} used twice")
    return specs


# --------------------------------------------------------------------------- reading docs

def load_docs(spec: TaskSpec, split: str | None) -> tuple[dict[str, list[dict]], int]:
    """({subject: docs}, number skipped) of one split; errors name the task."""
    try:
        if not spec.path.exists():
            raise D.EvalDataError(f"{spec.path} does not exist")
        if spec.format == "scieval":
            return D.load_scieval(spec.path, split)
        loader = {"mmlu": D.load_mmlu, "ceval": D.load_ceval, "cmmlu": D.load_cmmlu,
                  "gsm8k": D.load_gsm8k, "math": D.load_math, "humaneval": D.load_humaneval,
                  "mbpp": D.load_mbpp}
        return loader[spec.format](spec.path, split), 0
    except D.EvalDataError as exc:
        raise D.EvalDataError(f"task '{spec.name}' ({spec.format}): {exc}") from None


def select(groups: dict[str, list[dict]], max_items: int | None) -> dict[str, list[dict]]:
    """At most ``max_items`` docs, round-robin over groups in sorted order (deterministic)."""
    if max_items is None:
        return groups
    keys, taken = sorted(groups), {k: 0 for k in groups}
    total = 0
    while total < max_items and any(taken[k] < len(groups[k]) for k in keys):
        for k in keys:
            if total < max_items and taken[k] < len(groups[k]):
                taken[k] += 1
                total += 1
    return {k: groups[k][: taken[k]] for k in keys if taken[k]}


# --------------------------------------------------------------------------- prompts

_MC_TEXT = {
    "mmlu": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
            "D. {{choices[3]}}\nAnswer:",
    "ceval": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
             "D. {{choices[3]}}\n答案：",
}
_MC_TEXT["cmmlu"] = _MC_TEXT["ceval"]
_DESCRIPTION = {  # for subjects lm-eval does not know
    "mmlu": "The following are multiple choice questions (with answers) about {}.\n\n",
    "ceval": "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n",
}
_LM_EVAL_DIRS = {"mmlu": "mmlu/default", "ceval": "ceval", "cmmlu": "cmmlu"}


@functools.cache
def lm_eval_descriptions(fmt: str) -> dict[str, str]:
    """{subject: description} from the per-subject task YAMLs lm-eval ships."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / _LM_EVAL_DIRS[fmt]
    out = {}
    for p in sorted(folder.glob("*.yaml")):
        try:
            cfg = yaml.load(p.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            continue
        if isinstance(cfg, dict) and "dataset_name" in cfg and "description" in cfg:
            out[cfg["dataset_name"]] = cfg["description"]
    return out


def description(fmt: str, subject: str) -> str:
    known = lm_eval_descriptions(fmt)
    if subject in known:
        return known[subject]
    return _DESCRIPTION[fmt].format(subject.replace("_", " ") if fmt == "mmlu" else subject)


def scieval_context(doc: dict, shots: list[dict]) -> str:
    """SciEval's make_few_shot.py prompt, with the group's instruction first."""
    if not shots:
        return f"{doc['prompt']}\n{doc['question']}"
    examples = "".join(f"{s['question']} {s['labels'][s['answer']]}\n" for s in shots)
    return (f"{doc['prompt']}\nHere are some examples:\n{examples}"
            f"\nThen, the question is:\n{doc['question']} The answer is")


# --------------------------------------------------------------------------- lm-eval configs

def _gsm8k_results(doc, results):
    return {"exact_match": float(scoring.gsm8k_correct(scoring.extract_gsm8k(results[0]),
                                                       doc["target"]))}


def _math_results(doc, results):
    return {"exact_match": float(scoring.math_correct(scoring.extract_math(results[0]),
                                                      doc["answer"]))}


def code_completion(fmt: str, generation: str) -> str:
    """The code that runs: HumanEval cuts at its stop sequences, MBPP keeps the generation
    (already cut at ``[DONE]``)."""
    return scoring.truncate_completion(generation) if fmt == "humaneval" else generation


def _code_results(fmt: str, timeout: float):
    """process_results for HumanEval / MBPP; ``.statuses[doc id]`` keeps each run's outcome."""
    program = scoring.humaneval_program if fmt == "humaneval" else scoring.mbpp_program

    def process(doc, results):
        res = scoring.run_program(program(doc, code_completion(fmt, results[0])), timeout=timeout)
        process.statuses[doc["id"]] = res.status
        return {"pass@1": float(res.passed)}
    process.statuses = {}
    return process


# lm-eval's mbpp task (lm_eval/tasks/mbpp/mbpp.yaml), the three tests joined (every MBPP problem
# has three; tests/eval checks this renders as lm-eval's template)
MBPP_TEXT = ("You are an expert Python programmer, and here is your task: {{text}} Your code "
             "should pass these tests:\n\n{{test_list | join('\n')}}\n[BEGIN]\n")
MBPP_TARGET = "{{code}}\n[DONE]"


def _dataset(eval_docs: list[dict], shots: list[dict]):
    import datasets

    splits = {"eval": datasets.Dataset.from_list(eval_docs)}
    if shots:
        splits["fewshot"] = datasets.Dataset.from_list(shots)
    ds = datasets.DatasetDict(splits)
    return lambda **_: ds


@dataclass(kw_only=True)
class LMEvalTask:
    """One lm-eval task (a subject of a TaskSpec) and where its results go."""

    spec: TaskSpec
    subject: str
    lm_name: str
    config: dict = field(repr=False)
    docs: list[dict] = field(repr=False)


def _metric(name: str) -> list[dict]:
    return [{"metric": name, "aggregation": "mean", "higher_is_better": True}]


def build_lm_eval_configs(spec: TaskSpec) -> tuple[list[LMEvalTask], int]:
    """Read ``spec``'s files and return its lm-eval task configs (one per subject) + skipped."""
    fmt = spec.fmt
    groups, skipped = load_docs(spec, spec.eval_split)
    if spec.subjects is not None:
        missing = [s for s in spec.subjects if s not in groups]
        if missing:
            raise EvalConfigError(f"task '{spec.name}': unknown subject(s) {', '.join(missing)} "
                                  f"in {spec.path} (has: {', '.join(sorted(groups)[:20])} ...)")
        groups = {s: groups[s] for s in spec.subjects}
    groups = select(groups, spec.max_items)
    shots_by_group: dict[str, list[dict]] = {}
    if spec.num_fewshot:
        shots_by_group, _ = load_docs(spec, spec.fewshot_split or fmt.fewshot_split)
    tasks = []
    for i, (subject, docs) in enumerate(sorted(groups.items())):
        shot_pool = shots_by_group.get(subject if fmt.kind == MC else "all", [])
        if spec.format == "scieval":
            if spec.num_fewshot and not shot_pool:
                raise EvalConfigError(f"task '{spec.name}': no few-shot examples for SciEval group "
                                      f"'{subject}' in the '{spec.fewshot_split or fmt.fewshot_split}' file")
            docs = [dict(d, context=scieval_context(d, shot_pool[: spec.num_fewshot])) for d in docs]
            shots = []
        else:
            shots = shot_pool[: spec.num_fewshot]
            if len(shots) < spec.num_fewshot:
                raise EvalConfigError(
                    f"task '{spec.name}': {spec.num_fewshot}-shot needs {spec.num_fewshot} examples of "
                    f"'{subject}' in split '{spec.fewshot_split or fmt.fewshot_split}', found {len(shots)}")
        lm_name = f"megasyne_{spec.name}_{i:03d}"
        cfg = dict(task=lm_name, custom_dataset=_dataset(docs, shots), test_split="eval",
                   num_fewshot=len(shots), metadata={"version": 1})  # SciEval: in its context
        if shots:
            cfg.update(fewshot_split="fewshot", fewshot_config={"sampler": "first_n"})
        if spec.format in _MC_TEXT:
            cfg.update(output_type="multiple_choice", description=description(spec.format, subject),
                       doc_to_text=_MC_TEXT[spec.format], doc_to_choice=list(D.LETTERS),
                       doc_to_target="answer", metric_list=_metric("acc"))
        elif spec.format == "scieval":
            cfg.update(output_type="multiple_choice", doc_to_text="context", doc_to_choice="labels",
                       doc_to_target="answer", metric_list=_metric("acc"))
        elif spec.format == "gsm8k":
            cfg.update(output_type="generate_until", doc_to_text="Question: {{question}}\nAnswer:",
                       doc_to_target="{{answer}}", process_results=_gsm8k_results,
                       generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"],
                                          "do_sample": False, "max_gen_toks": spec.gen_tokens},
                       metric_list=_metric("exact_match"))
        elif spec.format == "math":
            cfg.update(output_type="generate_until", doc_to_text="Problem: {{problem}}\nAnswer:",
                       doc_to_target="{{answer}}", process_results=_math_results,
                       generation_kwargs={"until": ["Problem:"], "do_sample": False,
                                          "max_gen_toks": spec.gen_tokens},
                       metric_list=_metric("exact_match"))
        elif spec.format == "mbpp":
            cfg.update(output_type="generate_until", doc_to_text=MBPP_TEXT,
                       doc_to_target=MBPP_TARGET, target_delimiter="",
                       process_results=_code_results("mbpp", spec.timeout),
                       generation_kwargs={"until": list(scoring.MBPP_STOP), "do_sample": False,
                                          "max_gen_toks": spec.gen_tokens},
                       metric_list=_metric("pass@1"))
        else:  # humaneval
            cfg.update(output_type="generate_until", doc_to_text="prompt",
                       doc_to_target="canonical_solution",
                       process_results=_code_results("humaneval", spec.timeout),
                       generation_kwargs={"until": list(scoring.HUMANEVAL_STOP), "do_sample": False,
                                          "max_gen_toks": spec.gen_tokens},
                       metric_list=_metric("pass@1"))
        tasks.append(LMEvalTask(spec=spec, subject=subject, lm_name=lm_name, config=cfg, docs=docs))
    return tasks, skipped
