#!/usr/bin/env python
"""Tokenise JSON-lines / Parquet corpora into Megatron ``.bin``/``.idx`` datasets.

Megatron-LM's ``tools/preprocess_data.py`` flags, with streaming memory, atomic outputs, exact input
order with any ``--workers``, bad-line reporting and a per-document metadata sidecar::

    python tools/preprocess_data.py --input 'data/web/*.jsonl.zst' --json-keys text \\
        --tokenizer-model llama3/tokenizer.json --append-eod --workers 8 \\
        --output-prefix out/web --metadata-keys ppl,lang
    # -> out/web_text_document.{bin,idx}, out/web_text_document.meta/{ppl,lang}.npy,
    #    out/web_text_document.report.json

A dataset is complete or absent: its ``.idx`` is renamed into place last, after the ``.bin``, the
sidecar and the report. Exit status 2 with one line ``error: ...`` on a bad line, a truncated or corrupt
input file, a tokenizer worker that died (e.g. the OOM killer), a full disk or an output prefix
another run is writing; nothing is published then. A run killed outright leaves temporary files,
which the next run on the same --output-prefix removes.

See megasyne/data/preprocess.py for the pipeline, megasyne/data/staging.py for publishing and
megasyne/data/metadata.py for the sidecar.
"""

from __future__ import annotations

import argparse
import json
import sys

from megasyne.data.preprocess import PreprocessConfig, run_preprocess
from megasyne.data.tokenizers import ENGINES, MEGATRON_TOKENIZER_TYPES
from megasyne.errors import ConfigError, MegasyneError, report


def _split(values: list[str] | None) -> list[str]:
    """Accept both Megatron's space-separated lists and comma-separated ones."""
    return [v for item in values or [] for v in item.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help="files, globs or directories: .jsonl/.json (plain, .gz, .zst, .bz2, .xz) "
                        "or .parquet; processed in the given order (globs sorted)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="text keys; one dataset <output-prefix>_<key>_document per key")
    g.add_argument("--metadata-keys", nargs="*", default=[],
                   help="numeric or string keys copied into <dataset>.meta/ (e.g. ppl,lang)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip unparsable lines / missing keys (counted) instead of failing")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True,
                   help="tokenizer.json, SentencePiece .model or tiktoken ranks file (kind "
                        "detected from content), or a directory holding one")
    g.add_argument("--tokenizer-type", default=None,
                   help=f"Megatron's name, validated against the file: "
                        f"{', '.join(MEGATRON_TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-engine", choices=ENGINES, default="auto",
                   help="tokenizer.json only: auto encodes with tiktoken where the ids are the "
                        "same (Llama-3's file; 4-5x faster), else with the tokenizers library; "
                        "tokenizers forces that library; tiktoken refuses a file it cannot match")
    g.add_argument("--append-eod", action="store_true", help="end each document with EOD")
    g.add_argument("--prepend-bos", action="store_true", help="start each document with BOS")
    g.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--batch-size", type=int, default=256,
                   help="lines per worker task (a task also ends at 4 MiB)")
    g.add_argument("--log-interval", type=int, default=10000,
                   help="log progress every N documents (0: never)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--progress", action="store_true", help="tqdm bar even when not a terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        reports = _run(args)
    except MegasyneError as exc:
        return report(exc)
    except OSError as exc:  # unreadable input, unwritable output: the message names the path
        return report(exc)
    for r in reports.values():
        print(json.dumps({k: r[k] for k in ("dataset", "docs", "tokens", "skipped", "empty",
                                            "docs_per_s", "tokens_per_s")}))
    return 0


def _run(args) -> dict:
    if args.split_sentences:
        raise ConfigError("--split-sentences is not supported (one sequence per document)")
    kind = None
    if args.tokenizer_type is not None:
        if args.tokenizer_type not in MEGATRON_TOKENIZER_TYPES:
            raise ConfigError(f"--tokenizer-type {args.tokenizer_type} is not supported; use one "
                              f"of {', '.join(MEGATRON_TOKENIZER_TYPES)} (or leave it out: the "
                              "kind is detected from --tokenizer-model)")
        kind = MEGATRON_TOKENIZER_TYPES[args.tokenizer_type]
    cfg = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer_model,
        tokenizer_kind=kind, tokenizer_engine=args.tokenizer_engine,
        json_keys=_split(args.json_keys),
        metadata_keys=_split(args.metadata_keys), append_eod=args.append_eod,
        prepend_bos=args.prepend_bos, workers=args.workers,
        skip_bad_lines=args.skip_bad_lines, log_interval=args.log_interval,
        batch_size=args.batch_size,
        progress=False if args.no_progress else (True if args.progress else None))
    return run_preprocess(cfg)


if __name__ == "__main__":
    sys.exit(main())
