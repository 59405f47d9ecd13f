"""Synthetic scientific QA, end to end: seed pages -> snippets -> prompts -> backend -> filters ->
JSONL ready for ``tools/preprocess_data.py`` (key ``text``), with provenance and a run report.

Work items are ``(seed page, snippet, sample)``, keyed ``"<seed id>#<snippet>#<sample>"``, in
seed order. Files next to ``output`` (``out.jsonl``)::

    out.jsonl                  kept pairs, one JSON record each (text, problem, solution,
                               discipline, lang, seed_id, seed_source, snippet, sample, model,
                               backend, templates_sha256, created_at, key, id), in item order
    out.jsonl.state.jsonl      one line per judged item: {"key", "outcome"} (outcome "kept" or
                               the filter that dropped it)
    out.jsonl.responses.jsonl  every answer, journalled as it arrives (before judging)
    out.jsonl.failures.jsonl   requests that still failed after their retries, with the error
    out.jsonl.run.json         the settings the items were made with (a resume must match them)
    out.jsonl.report.json      counts at every filter, this run and in total (written atomically)

Filters (megasyne.syne.synth.filters), first to last: truncated, parse, validate, code block
(code disciplines), contamination, near-duplicate; a seed snippet that overlaps a benchmark is
not sent at all (outcome ``seed_contaminated``).

Order: an HTTP backend keeps ``--concurrency`` requests in flight and answers come back in any
order; they are judged in item order (an answer waits until those before it are back), so
the near-duplicate filter, hence the kept set and the output file, do not depend on the order
answers arrive in.

Resume (megasyne.syne.synth.store): an answer is journalled the moment it arrives, so a rerun
never requests an item whose answer came back; it judges the journalled answers it has not
judged yet, in the same order, and requests only what is missing. A request that fails after
its retries is written to the failures file and the item stays pending: the next run requests
it again (and, coming later, judges it after the items judged before it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from megasyne.atomic import atomic_write_json
from megasyne.jsonl import read_jsonl
from megasyne.syne.synth.filters import (  # SynthError: defined there, the lowest module
    Contamination,
    NearDuplicates,
    SynthError,
    parse_code,
    parse_qa,
    validate,
)
from megasyne.syne.synth.store import RunFiles
from megasyne.syne.synth.templates import Disciplines

OUTPUT_LABELS = {"en": ("Problem:", "Solution:"), "zh": ("问题：", "解答：")}


@dataclass(kw_only=True, frozen=True)
class Seed:
    """A seed page."""

    id: str
    text: str
    discipline: str
    lang: str
    source: str
    """Where it came from (file:line or dataset#document)."""


@dataclass(kw_only=True)
class SynthConfig:
    """Options of a synthesis run (see tools/synth_qa.py for their flags)."""

    output: str
    samples_per_snippet: int = 1
    snippet_chars: int = 1500
    """Longest seed snippet (characters); pages are cut at paragraph, then sentence, boundaries."""
    min_snippet_chars: int = 200
    max_snippets_per_page: int = 2
    benchmark_files: list[str] = field(default_factory=list)
    benchmark_fields: list[str] = field(default_factory=list)
    """Only the strings under these keys of JSON benchmark records (empty: every string)."""
    contamination_n: int = 13
    contamination_n_cjk: int = 20
    dedup_threshold: float = 0.8
    keep_truncated: bool = False
    """Keep answers cut by the token limit (dropped as 'truncated' by default)."""
    window: int | None = None
    """HTTP: most requests started past the oldest unfinished one (default 4 x concurrency);
    answers that overtake it wait in memory to be judged in item order."""
    sync_seconds: float = 0.5
    """Judged items are made durable (fsync) at most this often; a crash redoes at most that
    much judging, from the answer journal (nothing is requested again)."""
    max_items: int | None = None
    restart: bool = False
    rejects: str | None = None
    """Also write every dropped answer ({key, outcome, text}) to this JSONL (for prompt tuning)."""
    progress: bool = True
    kill_after_responses: int | None = None
    """Tests only: SIGKILL right after that many answers arrived in this run."""

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise SynthError(f"window must be >= 1 (got {self.window})")
        if self.sync_seconds < 0:
            raise SynthError(f"sync_seconds must be >= 0 (got {self.sync_seconds})")


def read_seed_pages(path: str, disciplines: Disciplines, *, lang: str = "en",
                    only: list[str] | None = None) -> tuple[list[Seed], dict]:
    """Seeds from JSONL pages ``{"text", "id"?, "discipline"? | "topic"?, "lang"?}``."""
    seeds, skipped = [], {"no_discipline": 0, "other_discipline": 0}
    for n, rec in read_jsonl(path, SynthError):
        if not isinstance(rec.get("text"), str):
            raise SynthError(f"{path}:{n}: expected an object with a string 'text'")
        d = disciplines.route(discipline=rec.get("discipline"), topic=rec.get("topic"),
                              text=rec["text"])
        if d is None:
            skipped["no_discipline"] += 1
            continue
        if only and d not in only:
            skipped["other_discipline"] += 1
            continue
        seeds.append(Seed(id=str(rec.get("id", f"{Path(path).name}:{n}")), text=rec["text"],
                          discipline=d, lang=str(rec.get("lang", lang)), source=f"{path}:{n}"))
    return seeds, skipped


def read_seed_dataset(prefix: str, tokenizer, disciplines: Disciplines, *, lang: str,
                      topic_field: str = "topic", max_tokens: int = 2048,
                      only: list[str] | None = None) -> tuple[list[Seed], dict]:
    """Seeds from a labelled ``.bin/.idx`` dataset (the categorical sidecar field ``topic_field``)."""
    from megasyne.data.indexed_dataset import IndexedDataset
    from megasyne.data.metadata import read_metadata_field
    from megasyne.syne.ppl import document_tokens

    ds = IndexedDataset(prefix)
    topics = read_metadata_field(prefix, topic_field, decode=True)
    seeds, skipped = [], {"no_discipline": 0, "other_discipline": 0}
    for doc, topic in enumerate(topics):
        text = tokenizer.decode(document_tokens(ds, doc)[:max_tokens])
        d = disciplines.route(topic=str(topic), text=text)
        if d is None or (only and d not in only):
            skipped["no_discipline" if d is None else "other_discipline"] += 1
            continue
        seeds.append(Seed(id=f"{Path(prefix).name}#{doc}", text=text, discipline=d, lang=lang,
                          source=f"{prefix}#{doc}"))
    return seeds, skipped


def snippets(text: str, max_chars: int, min_chars: int, limit: int) -> list[str]:
    """Up to ``limit`` pieces of at most ``max_chars``: whole paragraphs, else sentences."""
    pieces = []
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip()
        if len(para) <= max_chars:
            pieces.append(para)
        else:
            pieces.extend(s.strip() for s in re.split(r"(?<=[.!?。！？])\s*", para) if s.strip())
    out, cur = [], ""
    for p in pieces:
        p = p[:max_chars]
        if cur and len(cur) + 2 + len(p) > max_chars:
            out.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return [s for s in out if len(s) >= min_chars][:limit]


@dataclass(kw_only=True, frozen=True)
class Item:
    key: str
    seed: Seed
    snippet_index: int
    snippet: str
    sample: int


def plan_items(seeds: list[Seed], cfg: SynthConfig) -> tuple[list[Item], int]:
    """All work items in seed order, and the number of snippets."""
    items, n_snippets = [], 0
    for seed in seeds:
        for i, snip in enumerate(snippets(seed.text, cfg.snippet_chars, cfg.min_snippet_chars,
                                          cfg.max_snippets_per_page)):
            n_snippets += 1
            for k in range(cfg.samples_per_snippet):
                items.append(Item(key=f"{seed.id}#{i}#{k}", seed=seed, snippet_index=i,
                                  snippet=snip, sample=k))
    return items, n_snippets


def _settings(cfg: SynthConfig, backend, disciplines: Disciplines) -> dict:
    """What the kept pairs depend on: a resume must match it."""
    return {"model": backend.model_name, "backend": backend.name,
            "templates_sha256": disciplines.sha256,
            "sampling": {k: getattr(backend, k, None) for k in
                         ("temperature", "top_p", "max_tokens", "max_new_tokens")},
            "benchmarks": sorted(os.path.abspath(b) for b in cfg.benchmark_files),
            "benchmark_fields": sorted(cfg.benchmark_fields),
            **{k: getattr(cfg, k) for k in ("samples_per_snippet", "snippet_chars",
                                            "min_snippet_chars", "max_snippets_per_page",
                                            "contamination_n", "contamination_n_cjk",
                                            "dedup_threshold", "keep_truncated")}}


def run_synth(cfg: SynthConfig, backend, disciplines: Disciplines, seeds: list[Seed],
              skipped: dict | None = None) -> dict:
    """Generate, filter and save; returns the report (see the module docstring)."""
    t0 = time.time()
    files = RunFiles(cfg.output, rejects=cfg.rejects, sync_seconds=cfg.sync_seconds)
    run_path = files.sibling(".run.json")
    settings = _settings(cfg, backend, disciplines)
    if cfg.restart:
        files.remove_all()
    if run_path.exists() and json.loads(run_path.read_text()) != settings:
        old = json.loads(run_path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise SynthError(f"{run_path}: {files.out} was made with other settings (differs in "
                         f"{diff}); use the same settings to resume, another --output, or "
                         "--restart")
    # read before anything is written: a bad benchmark file leaves no run behind
    contamination = Contamination(cfg.benchmark_files, n=cfg.contamination_n,
                                  n_cjk=cfg.contamination_n_cjk,
                                  fields=tuple(cfg.benchmark_fields) or None) \
        if cfg.benchmark_files else None
    files.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_path, settings, indent=2, ensure_ascii=False)

    done, kept, answers = files.load()
    dedup = NearDuplicates(threshold=cfg.dedup_threshold)
    for r in kept:
        dedup.add(r["key"], r["problem"] + "\n" + r["solution"])
    items, n_snippets = plan_items(seeds, cfg)
    pending = [it for it in items if it.key not in done]
    already = len(items) - len(pending)
    if cfg.max_items is not None:
        pending = pending[:cfg.max_items]
    tally = _Tally()

    def judge(it: Item, resp) -> None:
        """Record one answer's outcome (in item order: near-duplicates depend on it)."""
        tally.count(it, resp)
        if resp.error is not None:
            return  # not judged: the item stays pending, the next run requests it again
        outcome, record = _judge(it, resp, disciplines, cfg, contamination, dedup, backend)
        if record is not None:
            dedup.add(it.key, record["problem"] + "\n" + record["solution"])
        reject = None if record else {"key": it.key, "outcome": outcome, "text": resp.text}
        files.judged(it.key, outcome, record, reject)
        done[it.key] = outcome
        tally.outcome(it, outcome)

    files.open()
    try:
        if contamination is not None:  # a seed that overlaps a benchmark is not used at all
            for it in [it for it in pending if contamination.match(it.snippet)]:
                files.judged(it.key, "seed_contaminated", None, None)
                done[it.key] = "seed_contaminated"
                tally.outcome(it, "seed_contaminated")
            pending = [it for it in pending if it.key not in done]
        _generate_in_order(pending, answers, backend, disciplines, cfg, files, judge)
    finally:
        files.close()
    total: dict[str, int] = {}
    for o in done.values():
        total[o] = total.get(o, 0) + 1
    report = {"output": str(files.out), "model": backend.model_name, "backend": backend.name,
              "seeds": len(seeds), "seeds_skipped": skipped or {}, "snippets": n_snippets,
              "items": len(items), "items_done_before": already,
              "answers_from_journal": tally.from_journal,
              "this_run": tally.run, "this_run_per_discipline": tally.per_discipline,
              "total": total, "kept_total": total.get("kept", 0),
              "pending": sum(it.key not in done for it in items),
              "backend_error_examples": tally.errors, "benchmarks": settings["benchmarks"],
              "contamination_items": contamination.items if contamination else 0,
              "seconds": round(time.time() - t0, 2)}
    atomic_write_json(files.sibling(".report.json"), report, indent=2, ensure_ascii=False)
    return report


class _Tally:
    """The report's counts of this run."""

    def __init__(self) -> None:
        self.run = {"requests": 0, "backend_errors": 0}
        self.per_discipline: dict[str, dict] = {}
        self.errors: list[str] = []
        self.from_journal = 0

    def count(self, it: Item, resp) -> None:
        if getattr(resp, "from_journal", False):
            self.from_journal += 1
        else:
            self.run["requests"] += 1
            pd = self.per_discipline.setdefault(it.seed.discipline, {"requests": 0, "kept": 0})
            pd["requests"] += 1
        if resp.error is not None:
            self.run["backend_errors"] += 1
            if len(self.errors) < 10:
                self.errors.append(f"{it.key}: {resp.error}")

    def outcome(self, it: Item, outcome: str) -> None:
        self.run[outcome] = self.run.get(outcome, 0) + 1
        if outcome == "kept":
            self.per_discipline.setdefault(it.seed.discipline, {"requests": 0, "kept": 0})
            self.per_discipline[it.seed.discipline]["kept"] += 1


def _generate_in_order(pending: list[Item], answers: dict[str, dict], backend,
                       disciplines: Disciplines, cfg: SynthConfig, files: RunFiles,
                       judge) -> None:
    """Request every pending item without a journalled answer (``backend.stream`` keeps its
    requests in flight), journal each answer or failure as it arrives, and judge the items in
    their order as soon as all before them are back: the outcome is the same whatever order the
    answers come in, and a crash loses no answer that arrived."""
    from tqdm import tqdm

    from megasyne.syne.synth.generators import Request, Response

    ready: dict[str, Response] = {}
    for it in pending:
        a = answers.get(it.key)
        if a is not None:
            ready[it.key] = Response(key=it.key, text=a["text"], truncated=a["truncated"],
                                     attempts=a.get("attempts", 1), seconds=a.get("seconds", 0.0))
            ready[it.key].from_journal = True

    journalled = set(ready)  # fixed now: drain() pops from ready while requests() runs

    def requests():
        for it in pending:
            if it.key not in journalled:
                msgs, prefix = disciplines[it.seed.discipline].messages(it.snippet, it.seed.lang)
                yield Request(key=it.key, messages=msgs, response_prefix=prefix)

    head, received = 0, 0
    with tqdm(total=len(pending), unit="item", desc="synth_qa", disable=not cfg.progress,
              dynamic_ncols=True) as bar:
        def drain() -> None:
            nonlocal head
            while head < len(pending) and pending[head].key in ready:
                judge(pending[head], ready.pop(pending[head].key))
                head += 1
                bar.update(1)
            files.commit()

        drain()
        for resp in backend.stream(requests(), window=cfg.window):
            if resp.error is None:
                files.answer({"key": resp.key, "text": resp.text, "truncated": resp.truncated,
                              "attempts": resp.attempts, "seconds": round(resp.seconds, 3)})
            else:
                files.failure({"key": resp.key, "error": resp.error, "attempts": resp.attempts,
                               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(
                                   timespec="seconds")})
            ready[resp.key] = resp
            received += 1
            if cfg.kill_after_responses is not None and received >= cfg.kill_after_responses:
                os.kill(os.getpid(), signal.SIGKILL)
            drain()
    if head != len(pending) or ready:  # a backend that lost or invented an answer: a bug
        raise RuntimeError(f"synth_qa: answers and items do not match (item {head} of "
                           f"{len(pending)}, {len(ready)} answer(s) left over)")


def _judge(it: Item, resp, disciplines: Disciplines, cfg: SynthConfig, contamination, dedup,
           backend) -> tuple[str, dict | None]:
    """(outcome, record or None): the first filter that drops the answer, else 'kept'."""
    if resp.truncated and not cfg.keep_truncated:
        return "truncated", None
    pair, why = parse_qa(resp.text)
    if pair is None:
        return why, None
    disc = disciplines[it.seed.discipline]
    limits = {k: getattr(disc, k) for k in ("min_problem_chars", "max_problem_chars",
                                             "min_solution_chars", "max_solution_chars")}
    why = validate(pair, lang=it.seed.lang, seed=it.snippet, limits=limits, kind=disc.kind)
    if why:
        return why, None
    code = None
    if disc.kind == "code":
        code, why = parse_code(pair.solution)
        if why:
            return why, None
    if contamination is not None and contamination.match(pair.problem + "\n" + pair.solution):
        return "contaminated", None
    if dedup.duplicate_of(pair.problem + "\n" + pair.solution) is not None:
        return "near_duplicate", None
    p_label, s_label = OUTPUT_LABELS.get(it.seed.lang, OUTPUT_LABELS["en"])
    record = {
        "id": hashlib.sha256(it.key.encode()).hexdigest()[:16], "key": it.key,
        "text": f"{p_label} {pair.problem}\n{s_label} {pair.solution}".replace("： ", "："),
        "problem": pair.problem, "solution": pair.solution, "discipline": disc.id,
        "lang": it.seed.lang, "seed_id": it.seed.id, "seed_source": it.seed.source,
        "snippet": it.snippet_index, "sample": it.sample, "model": backend.model_name,
        "backend": backend.name, "templates_sha256": disciplines.sha256,
        **({"code": code} if code is not None else {}),
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return "kept", record


__all__ = ["Item", "Seed", "SynthConfig", "SynthError", "plan_items", "read_seed_dataset",
           "read_seed_pages", "run_synth", "snippets"]
