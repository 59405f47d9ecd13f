#!/usr/bin/env python
"""Generate synthetic scientific (or programming) problem + solution pairs from seed pages (SynE stage II data).

Seeds: scientific web pages as JSONL (``text`` + ``discipline``, or a ``topic`` from
tools/label_topics.py), or a labelled .bin/.idx dataset. Prompts: one template per discipline
(9 disciplines, examples/syne/disciplines.yaml). Every answer is parsed and validated, near
duplicates (MinHash) and pairs overlapping the given benchmark files (n-grams) are dropped; the
rest is written as JSONL with provenance, ready for tools/preprocess_data.py (key ``text``)::

    # an OpenAI-compatible server (vLLM, SGLang, llama.cpp server, ...)
    python tools/synth_qa.py --pages pages.topic.jsonl --output synth/qa.jsonl \\
        --openai-url http://127.0.0.1:8000/v1 --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --concurrency 32 --benchmark eval/mmlu_test.jsonl eval/math_test.jsonl
    # a local transformers model
    python tools/synth_qa.py --pages examples/syne/data/science_pages.jsonl \\
        --output /tmp/qa.jsonl --hf-model "$(python tools/prepare_smollm2.py)"
    # code QA from LeetCode-style statements, checked against HumanEval / MBPP statements
    python tools/synth_qa.py --pages examples/syne/code_seeds.jsonl \\
        --disciplines examples/syne/code_disciplines.yaml --output synth/code_qa.jsonl \\
        --openai-url http://127.0.0.1:8000/v1 --model mistralai/Mistral-7B-Instruct-v0.2 \\
        --benchmark HumanEval.jsonl.gz mbpp/mbpp.jsonl --benchmark-fields prompt text
    # then: python tools/preprocess_data.py --input synth/qa.jsonl --json-keys text ...

Interrupted runs continue where they stopped (same command): answers that came back are never
requested again; requests that failed after --retries are listed in <output>.failures.jsonl and
requested again by the next run. The API key is read from the
environment variable named by --api-key-env (default OPENAI_API_KEY), never from the command line.
Prints the run report (also <output>.report.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import megasyne  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DISCIPLINES = os.path.join(ROOT, "examples", "syne", "disciplines.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("seeds")
    s = g.add_mutually_exclusive_group(required=True)
    s.add_argument("--pages", help="JSONL seed pages: text, id?, discipline? or topic?, lang?")
    s.add_argument("--data-prefix", help="labelled dataset (needs --tokenizer, --lang)")
    g.add_argument("--tokenizer", help="tokenizer of --data-prefix")
    g.add_argument("--topic-field", default="topic")
    g.add_argument("--lang", default="en", help="language of seeds that do not say (en, zh)")
    g.add_argument("--disciplines", default=DEFAULT_DISCIPLINES, help="templates file")
    g.add_argument("--only", nargs="*", default=None, help="discipline ids to generate")
    g.add_argument("--snippet-chars", type=int, default=1500)
    g.add_argument("--min-snippet-chars", type=int, default=200)
    g.add_argument("--snippets-per-page", type=int, default=2)
    g.add_argument("--samples", type=int, default=1, help="answers per snippet")
    b = p.add_argument_group("backend")
    m = b.add_mutually_exclusive_group(required=True)
    m.add_argument("--openai-url", help="base URL of an OpenAI-compatible API (…/v1)")
    m.add_argument("--hf-model", help="local transformers model directory")
    b.add_argument("--model", help="model name sent to the API")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY")
    b.add_argument("--concurrency", type=int, default=8,
                   help="HTTP requests in flight at all times")
    b.add_argument("--window", type=int, default=None,
                   help="most requests started past the oldest unfinished one "
                        "(default 4 x --concurrency)")
    b.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    b.add_argument("--retries", type=int, default=4)
    b.add_argument("--backoff", type=float, default=1.0, help="first retry delay (s)")
    b.add_argument("--temperature", type=float, default=0.7)
    b.add_argument("--top-p", type=float, default=0.95)
    b.add_argument("--max-tokens", type=int, default=1024, help="new tokens per answer")
    b.add_argument("--batch-size", type=int, default=4, help="transformers batch")
    f = p.add_argument_group("filters and output")
    f.add_argument("--output", required=True, help="JSONL of kept pairs")
    f.add_argument("--benchmark", nargs="*", default=[],
                   help="benchmark files (.jsonl/.json/.txt, .gz ok) for the contamination check")
    f.add_argument("--benchmark-fields", nargs="*", default=[],
                   help="only these keys of JSON benchmark records (e.g. prompt text: HumanEval's "
                        "and MBPP's problem statements); default every string")
    f.add_argument("--ngram", type=int, default=13, help="contamination n-gram (words)")
    f.add_argument("--ngram-cjk", type=int, default=20, help="contamination n-gram (CJK chars)")
    f.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold")
    f.add_argument("--keep-truncated", action="store_true",
                   help="keep answers cut by --max-tokens (dropped by default)")
    f.add_argument("--rejects", default=None,
                   help="also write dropped answers with their reason to this JSONL")
    f.add_argument("--max-items", type=int, default=None, help="stop after this many items")
    f.add_argument("--restart", action="store_true", help="discard earlier output and state")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--debug-kill-after-responses", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megasyne.errors import MegasyneError, report
    from megasyne.syne.synth.pipeline import (
        SynthConfig,
        SynthError,
        read_seed_dataset,
        read_seed_pages,
        run_synth,
    )
    from megasyne.syne.synth.templates import load_disciplines

    try:
        disciplines = load_disciplines(args.disciplines)
        for d in args.only or []:
            disciplines[d]  # unknown ids fail now, naming the file
        if args.pages:
            seeds, skipped = read_seed_pages(args.pages, disciplines, lang=args.lang,
                                             only=args.only)
        else:
            if not args.tokenizer:
                raise SynthError("--data-prefix needs --tokenizer")
            from megasyne.data.tokenizers import load_tokenizer

            seeds, skipped = read_seed_dataset(args.data_prefix, load_tokenizer(args.tokenizer),
                                               disciplines, lang=args.lang,
                                               topic_field=args.topic_field, only=args.only)
        if args.openai_url:
            from megasyne.syne.synth.generators import OpenAIChatBackend

            if not args.model:
                raise SynthError("--openai-url needs --model")
            backend = OpenAIChatBackend(
                base_url=args.openai_url, model=args.model, api_key=os.environ.get(args.api_key_env),
                concurrency=args.concurrency, timeout=args.timeout, max_retries=args.retries,
                backoff=args.backoff, temperature=args.temperature, top_p=args.top_p,
                max_tokens=args.max_tokens)
            window = args.window
        else:
            from megasyne.syne.synth.generators import TransformersBackend

            if not os.path.isfile(os.path.join(args.hf_model, "config.json")):
                raise SynthError(f"--hf-model {args.hf_model}: no config.json there (a Hugging "
                                 f"Face model directory is expected)")
            backend = TransformersBackend(args.hf_model, max_new_tokens=args.max_tokens,
                                          temperature=args.temperature, top_p=args.top_p,
                                          batch_size=args.batch_size)
            window = None
        cfg = SynthConfig(output=args.output, samples_per_snippet=args.samples,
                          snippet_chars=args.snippet_chars, min_snippet_chars=args.min_snippet_chars,
                          max_snippets_per_page=args.snippets_per_page,
                          benchmark_files=args.benchmark,
                          benchmark_fields=args.benchmark_fields, contamination_n=args.ngram,
                          contamination_n_cjk=args.ngram_cjk, dedup_threshold=args.dedup_threshold,
                          keep_truncated=args.keep_truncated, window=window,
                          max_items=args.max_items, restart=args.restart, rejects=args.rejects,
                          progress=not args.no_progress,
                          kill_after_responses=args.debug_kill_after_responses)
        report = run_synth(cfg, backend, disciplines, seeds, skipped)
    except MegasyneError as exc:
        return report(exc)
    print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
