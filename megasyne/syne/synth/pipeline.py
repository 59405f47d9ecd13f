"""Synthetic scientific QA, end to end: seed pages -> snippets -> prompts -> backend -> filters ->
JSONL ready for ``tools/preprocess_data.py`` (key ``text``), with provenance and a run report.

Work items are ``(seed page, snippet, sample)``, keyed ``"<seed id>#<snippet>#<sample>"``. Files
next to ``output`` (``out.jsonl``)::

    out.jsonl              kept pairs, one JSON record each (text, problem, solution, discipline,
                           lang, seed_id, seed_source, snippet, sample, model, backend,
                           templates_sha256, created_at, key, id)
    out.jsonl.state.jsonl  one line per finished item: {"key", "outcome"} (outcome "kept" or the
                           filter that dropped it)
    out.jsonl.run.json     the settings the items were made with (a resume must match them)
    out.jsonl.report.json  counts at every filter, this run and in total (written atomically)

Resume: an item is finished once its state line is on disk (the kept record is appended, and
fsynced, first). A restart drops a half-written last line, forgets records whose state line is
missing (the item is redone), rebuilds the near-duplicate index from the kept records and goes on
with the unfinished items. Backend errors are not recorded: the next run retries those items.
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

from megasyne.atomic import atomic_write_json, atomic_write_text
from megasyne.jsonl import read_jsonl
from megasyne.syne.synth.filters import (  # SynthError: defined there, the lowest module
    Contamination,
    NearDuplicates,
    SynthError,
    parse_qa,
    validate,
)
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
    contamination_n: int = 13
    contamination_n_cjk: int = 20
    dedup_threshold: float = 0.8
    keep_truncated: bool = False
    """Keep answers cut by the token limit (dropped as 'truncated' by default)."""
    chunk: int = 16
    """Items generated per round (a round's results are filtered and saved in order)."""
    max_items: int | None = None
    restart: bool = False
    rejects: str | None = None
    """Also write every dropped answer ({key, outcome, text}) to this JSONL (for prompt tuning)."""
    progress: bool = True
    kill_after_items: int | None = None
    """Tests only: SIGKILL after that many items were finished in this run."""


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


def _read_lines(path: Path) -> list[dict]:
    """JSON lines of ``path``; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]


def _append(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_synth(cfg: SynthConfig, backend, disciplines: Disciplines, seeds: list[Seed],
              skipped: dict | None = None) -> dict:
    """Generate, filter and save; returns the report (see the module docstring)."""
    from tqdm import tqdm

    t0 = time.time()
    out = Path(cfg.output)
    state_path = out.with_name(out.name + ".state.jsonl")
    run_path = out.with_name(out.name + ".run.json")
    settings = {"model": backend.model_name, "backend": backend.name,
                "templates_sha256": disciplines.sha256,
                "sampling": {k: getattr(backend, k, None) for k in
                             ("temperature", "top_p", "max_tokens", "max_new_tokens")},
                "benchmarks": sorted(os.path.abspath(b) for b in cfg.benchmark_files),
                **{k: getattr(cfg, k) for k in ("samples_per_snippet", "snippet_chars",
                                                "min_snippet_chars", "max_snippets_per_page",
                                                "contamination_n", "contamination_n_cjk",
                                                "dedup_threshold", "keep_truncated")}}
    if cfg.restart:
        for p in (out, state_path, run_path):
            p.unlink(missing_ok=True)
    if run_path.exists() and json.loads(run_path.read_text()) != settings:
        old = json.loads(run_path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise SynthError(f"{run_path}: {out} was made with other settings (differs in {diff}); "
                         "use the same settings to resume, another --output, or --restart")
    # read before anything is written: a bad benchmark file leaves no run behind
    contamination = Contamination(cfg.benchmark_files, n=cfg.contamination_n,
                                  n_cjk=cfg.contamination_n_cjk) if cfg.benchmark_files else None
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_path, settings, indent=2, ensure_ascii=False)

    done = {r["key"]: r["outcome"] for r in _read_lines(state_path)}
    kept = [r for r in _read_lines(out) if done.get(r.get("key")) == "kept"]
    if len(kept) != len(_read_lines(out)):  # records of items whose state line never landed
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    dedup = NearDuplicates(threshold=cfg.dedup_threshold)
    for r in kept:
        dedup.add(r["key"], r["problem"] + "\n" + r["solution"])

    items, n_snippets = plan_items(seeds, cfg)
    pending = [it for it in items if it.key not in done]
    already = len(items) - len(pending)
    if cfg.max_items is not None:
        pending = pending[:cfg.max_items]
    run = {"requests": 0, "backend_errors": 0}
    per_disc: dict[str, dict] = {}
    errors: list[str] = []
    bar = tqdm(total=len(pending), unit="item", desc="synth_qa", disable=not cfg.progress,
               dynamic_ncols=True)
    finished = 0
    frej = open(cfg.rejects, "a", encoding="utf-8") if cfg.rejects else None
    with open(out, "a", encoding="utf-8") as fout, open(state_path, "a", encoding="utf-8") as fstate:
        for c in range(0, len(pending), cfg.chunk):
            chunk = pending[c:c + cfg.chunk]
            reqs = []
            for it in chunk:
                msgs, prefix = disciplines[it.seed.discipline].messages(it.snippet, it.seed.lang)
                reqs.append(_request(it.key, msgs, prefix))
            responses = backend.generate(reqs)
            for it, resp in zip(chunk, responses):
                run["requests"] += 1
                pd = per_disc.setdefault(it.seed.discipline, {"requests": 0, "kept": 0})
                pd["requests"] += 1
                bar.update(1)
                if resp.error is not None:
                    run["backend_errors"] += 1
                    if len(errors) < 10:
                        errors.append(f"{it.key}: {resp.error}")
                    continue
                outcome, record = _judge(it, resp, disciplines, cfg, contamination, dedup, backend)
                if record is None and frej is not None:
                    _append(frej, {"key": it.key, "outcome": outcome, "text": resp.text})
                if record is not None:
                    _append(fout, record)
                    dedup.add(it.key, record["problem"] + "\n" + record["solution"])
                    pd["kept"] += 1
                _append(fstate, {"key": it.key, "outcome": outcome})
                done[it.key] = outcome
                run[outcome] = run.get(outcome, 0) + 1
                finished += 1
                if cfg.kill_after_items is not None and finished >= cfg.kill_after_items:
                    os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if frej is not None:
        frej.close()
    total: dict[str, int] = {}
    for o in done.values():
        total[o] = total.get(o, 0) + 1
    report = {"output": str(out), "model": backend.model_name, "backend": backend.name,
              "seeds": len(seeds), "seeds_skipped": skipped or {}, "snippets": n_snippets,
              "items": len(items), "items_done_before": already,
              "this_run": run, "this_run_per_discipline": per_disc, "total": total,
              "kept_total": total.get("kept", 0),
              "pending": sum(it.key not in done for it in items),
              "backend_error_examples": errors, "benchmarks": settings["benchmarks"],
              "contamination_items": contamination.items if contamination else 0,
              "seconds": round(time.time() - t0, 2)}
    atomic_write_json(out.with_name(out.name + ".report.json"), report, indent=2,
                      ensure_ascii=False)
    return report


def _request(key, messages, prefix):
    from megasyne.syne.synth.generators import Request

    return Request(key=key, messages=messages, response_prefix=prefix)


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
    why = validate(pair, lang=it.seed.lang, seed=it.snippet, limits=limits)
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
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return "kept", record


__all__ = ["Item", "Seed", "SynthConfig", "SynthError", "plan_items", "read_seed_dataset",
           "read_seed_pages", "run_synth", "snippets"]
