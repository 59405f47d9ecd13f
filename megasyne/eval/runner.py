"""Run tasks on a Scorer through lm-eval; results JSON, paper-like tables, run comparisons.

Scores are micro-averages over a task's questions (every MMLU question weighs the same,
as lm-eval's ``mmlu`` group reports), in [0, 1] in the JSON and in percent in tables.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from megasyne.eval.tasks import CODE, MC, EvalConfigError, TaskSpec, build_lm_eval_configs

RESULTS_FORMAT = "megasyne-eval/1"
DISPLAY = {"mmlu": "MMLU", "ceval": "C-Eval", "cmmlu": "CMMLU", "math": "MATH", "gsm8k": "GSM8K",
           "scieval": "SciEval", "humaneval": "HumanEval", "mbpp": "MBPP"}
PAPER_ORDER = ["mmlu", "ceval", "cmmlu", "math", "gsm8k", "scieval", "humaneval", "mbpp"]


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _versions() -> dict:
    import lm_eval
    import torch
    import transformers

    import megasyne

    return {"megasyne": megasyne.__version__, "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def run_tasks(scorer, specs: list[TaskSpec], *, allow_code_execution: bool = False) -> dict:
    """Evaluate ``specs`` on ``scorer``: {"tasks": {name: summary}, "items": {name: [...]}}."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from megasyne.eval.lm import scorer_lm

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise EvalConfigError(f"task names must be unique, got {names}")
    for s in specs:
        if s.fmt.kind == CODE and not allow_code_execution:
            raise EvalConfigError(
                f"task '{s.name}' executes model-written code: allow it explicitly "
                f"(--allow-code-execution; it runs in a child process with limits, see "
                f"megasyne.eval.scoring)")
    _quiet_lm_eval()
    built, skipped = [], {}
    for s in specs:
        tasks, skipped[s.name] = build_lm_eval_configs(s)
        built.extend(tasks)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task_dict = get_task_dict([t.config for t in built], TaskManager(include_defaults=False))
        out = evaluate(scorer_lm(scorer), task_dict, log_samples=True, bootstrap_iters=0,
                       verbosity="ERROR")
    items: dict[str, list] = {s.name: [] for s in specs}
    for t in built:
        samples = sorted(out["samples"][t.lm_name], key=lambda x: x["doc_id"])
        for sample in samples:
            items[t.spec.name].append(_item(t.spec, t.subject, sample, t.config))
    tasks_out = {}
    for s in specs:
        its = items[s.name]
        subjects: dict[str, dict] = {}
        for it in its:
            sub = subjects.setdefault(it["subject"], {"correct": 0, "n": 0})
            sub["correct"] += int(it["correct"])
            sub["n"] += 1
        tasks_out[s.name] = {
            "format": s.format, "metric": s.fmt.metric, "kind": s.fmt.kind,
            "score": sum(it["correct"] for it in its) / len(its) if its else None,
            "n": len(its), "skipped": skipped[s.name], "num_fewshot": s.num_fewshot,
            "split": s.eval_split, "path": str(s.path), "max_items": s.max_items,
            "max_new_tokens": s.gen_tokens if s.fmt.kind != MC else None,
            "subjects": {k: {"score": v["correct"] / v["n"], "n": v["n"]} for k, v in sorted(subjects.items())},
        }
    return {"tasks": tasks_out, "items": items}


def _item(spec: TaskSpec, subject: str, sample: dict, config: dict) -> dict:
    doc = sample["doc"]
    rec = {"id": str(doc.get("id")), "subject": subject, "source": doc.get("source"),
           "prompt_sha256": sample.get("prompt_hash")}
    if spec.fmt.kind == MC:
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        pred = max(range(len(lls)), key=lls.__getitem__)
        rec.update(target=int(doc["answer"]), pred=pred, logliks=lls,
                   correct=bool(sample["acc"] > 0.5))
        return rec
    generation = sample["resps"][0][0]
    metric = spec.fmt.metric
    rec.update(generation=generation, correct=bool(sample[metric] > 0.5))
    if spec.format == "gsm8k":
        from megasyne.eval.scoring import extract_gsm8k

        rec.update(target=doc["target"], pred=extract_gsm8k(generation))
    elif spec.format == "math":
        from megasyne.eval.scoring import extract_math

        rec.update(target=doc["answer"], pred=extract_math(generation).strip())
    else:  # humaneval, mbpp: what ran, and how it ended
        from megasyne.eval.tasks import code_completion

        rec.update(completion=code_completion(spec.format, generation),
                   status=config["process_results"].statuses.get(doc["id"]))
    return rec


def evaluate(scorer, specs: list[TaskSpec], *, name: str, model: dict,
             allow_code_execution: bool = False) -> dict:
    """A complete results document for one run (see write_results)."""
    start = time.time()
    body = run_tasks(scorer, specs, allow_code_execution=allow_code_execution)
    return {"format": RESULTS_FORMAT, "name": name, "model": model, "scorer": scorer.describe(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - start, 2), "versions": _versions(), **body}


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EvalConfigError(f"results file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise EvalConfigError(f"{path}: not a megasyne results file (format {RESULTS_FORMAT})")
    return doc


# --------------------------------------------------------------------------- tables

def _columns(runs: list[dict]) -> list[str]:
    seen = []
    for r in runs:
        seen += [t for t in r["tasks"] if t not in seen]
    order = {n: i for i, n in enumerate(PAPER_ORDER)}
    return sorted(seen, key=lambda n: (order.get(n, len(order)), seen.index(n)))


def _pct(score) -> str:
    return "-" if score is None else f"{100 * score:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *map(line, rows)])


def format_table(runs: list[dict]) -> str:
    """One row per run, one column per benchmark (percent), as the paper's tables."""
    cols = _columns(runs)
    header = ["Model"] + [DISPLAY.get(c, c) for c in cols]
    rows = [[r["name"]] + [_pct(r["tasks"][c]["score"]) if c in r["tasks"] else "-" for c in cols]
            for r in runs]
    shots = ", ".join(f"{DISPLAY.get(c, c)} {_shots(runs, c)}" for c in cols)
    return _markdown(header, rows) + f"\n\nfew-shot: {shots}"


def _shots(runs, c) -> str:
    values = sorted({r["tasks"][c]["num_fewshot"] for r in runs if c in r["tasks"]})
    return "/".join(map(str, values)) + "-shot"


def compare(before: dict, after: dict) -> tuple[str, list[dict]]:
    """Before/after table (points of difference) and per-task rows, with item flips.

    Only tasks evaluated with the same settings (format, split, shots, items) are compared;
    the others are listed as not comparable.
    """
    rows, out = [], []
    for c in _columns([before, after]):
        a, b = before["tasks"].get(c), after["tasks"].get(c)
        if a is None or b is None:
            rows.append([DISPLAY.get(c, c), _pct(a and a["score"]), _pct(b and b["score"]), "-",
                         "only in one run"])
            continue
        keys = ("format", "split", "num_fewshot", "n")
        if any(a[k] != b[k] for k in keys):
            diff = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k])
            rows.append([DISPLAY.get(c, c), _pct(a["score"]), _pct(b["score"]), "-",
                         f"not comparable: {diff}"])
            continue
        before_items = {i["id"]: i["correct"] for i in before["items"].get(c, [])}
        gained = sum(1 for i in after["items"].get(c, []) if i["correct"] and before_items.get(i["id"]) is False)
        lost = sum(1 for i in after["items"].get(c, []) if not i["correct"] and before_items.get(i["id"]) is True)
        delta = 100 * (b["score"] - a["score"])
        rec = {"task": c, "before": a["score"], "after": b["score"], "delta_points": delta,
               "gained": gained, "lost": lost, "n": b["n"]}
        out.append(rec)
        rows.append([DISPLAY.get(c, c), _pct(a["score"]), _pct(b["score"]), f"{delta:+.2f}",
                     f"n={b['n']}, +{gained} / -{lost} questions"])
    table = _markdown(["Benchmark", before["name"], after["name"], "Δ (points)", "notes"], rows)
    return table, out
