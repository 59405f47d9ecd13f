#!/usr/bin/env python
"""Evaluate a megasyne checkpoint or a Hugging Face model on the paper's benchmarks, offline.

    # the paper's settings on local copies of the benchmarks (layout: megasyne.eval.tasks)
    python tools/evaluate.py run --hf-dir llama3-8b/ --preset paper --data-root /data/bench \\
        --allow-code-execution --output results/llama3-8b.json
    # a megasyne checkpoint (any saved TP/PP): exported to HF in a temporary directory ...
    python tools/evaluate.py run --checkpoint runs/syne/checkpoints --tokenizer llama3-8b/ \\
        --preset paper --data-root /data/bench --tasks mmlu,ceval,cmmlu --output results/syne.json
    # ... or loaded directly into the Megatron-Core training model (one process, TP1)
    python tools/evaluate.py run --checkpoint runs/syne/checkpoints --load megatron ...
    # a task file instead of a preset (examples/eval/README.md)
    python tools/evaluate.py run --hf-dir DIR --task-file examples/eval/paper.yaml --output r.json
    # tables
    python tools/evaluate.py table results/llama3-8b.json results/syne.json
    python tools/evaluate.py compare results/llama3-8b.json results/syne.json

Multiple choice (MMLU, C-Eval, CMMLU, SciEval): answer log-likelihood through lm-eval;
GSM8K / MATH: greedy generation, answer extraction, exact match; HumanEval: greedy
completion run against its unit tests in a child process with a timeout (opt in with
--allow-code-execution). Results: one JSON file per run (written atomically), with every
question's prediction. Exit status 2 on a configuration or data error (the message names
the file, line or task).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.errors import MegasyneError, report
from megasyne.eval.tasks import EvalConfigError, load_task_file, preset_tasks

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate one model, write a results JSON")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model directory")
    src.add_argument("--checkpoint", help="megasyne checkpoint root (uses 'latest') or iter_* dir")
    r.add_argument("--tokenizer", help="tokenizer directory for --checkpoint (default: the HF "
                                       "directory recorded in a converted checkpoint)")
    r.add_argument("--load", choices=["export", "megatron"], default="export",
                   help="--checkpoint: export to HF in a temp dir (default) or load into Megatron")
    tasks = r.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--preset", choices=["paper"], help="the paper's tasks and few-shot settings")
    tasks.add_argument("--task-file", help="YAML task file (see megasyne/eval/tasks.py)")
    r.add_argument("--data-root", help="benchmark root (preset paths; overrides a task file's)")
    r.add_argument("--tasks", help="comma-separated subset of the preset's / file's tasks")
    r.add_argument("--max-items", type=int, help="at most N questions per task (quick runs)")
    r.add_argument("--output", required=True, help="results JSON to write")
    r.add_argument("--name", help="row name in tables (default: the model directory's name)")
    r.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    r.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    r.add_argument("--max-length", type=int, help="context length (default: the model's)")
    r.add_argument("--allow-code-execution", action="store_true",
                   help="run HumanEval's unit tests on model-written code (child process, limits)")
    r.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("table", help="paper-like table of results files")
    t.add_argument("results", nargs="+")
    c = sub.add_parser("compare", help="before/after differences of two results files")
    c.add_argument("before")
    c.add_argument("after")
    return p


def _specs(args):
    if args.preset:
        if not args.data_root:
            raise EvalConfigError("--preset needs --data-root (the directory holding the benchmarks)")
        names = args.tasks.split(",") if args.tasks else None
        return preset_tasks(args.preset, args.data_root, names, max_items=args.max_items)
    specs = load_task_file(args.task_file, args.data_root)
    if args.tasks:
        wanted = args.tasks.split(",")
        known = {s.name: s for s in specs}
        for n in wanted:
            if n not in known:
                raise EvalConfigError(f"unknown task '{n}' ({args.task_file} has: {', '.join(known)})")
        specs = [known[n] for n in wanted]
    if args.max_items:
        import dataclasses

        specs = [dataclasses.replace(s, max_items=args.max_items) for s in specs]
    return specs


def _tokenizer_dir(args, manifest: dict) -> Path:
    if args.tokenizer:
        path = Path(args.tokenizer)
    else:
        recorded = (manifest.get("extra") or {}).get("hf_dir")
        if not recorded:
            raise EvalConfigError(f"{args.checkpoint}: the checkpoint records no HF directory; "
                                  f"pass --tokenizer DIR")
        path = Path(recorded)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise EvalConfigError(f"tokenizer directory {path} has no tokenizer.json / tokenizer_config.json"
                              + ("" if args.tokenizer else " (recorded in the checkpoint; pass --tokenizer)"))
    return path


def run(args) -> int:
    import torch

    from megasyne.eval.lm import hf_model_scorer, megasyne_model_scorer
    from megasyne.eval.runner import evaluate, format_table, write_results

    specs = _specs(args)  # every task / file problem fails here, before any model loads
    dtype = getattr(torch, DTYPES[args.dtype])
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
    if args.max_length:
        kw["max_length"] = args.max_length
    with tempfile.TemporaryDirectory(prefix="megasyne-eval-") as tmp:
        if args.hf_dir:
            if not (Path(args.hf_dir) / "config.json").is_file():
                raise EvalConfigError(f"--hf-dir {args.hf_dir}: no config.json there")
            scorer = hf_model_scorer(args.hf_dir, dtype=dtype, **kw)
            model = {"kind": "hf", "path": str(Path(args.hf_dir).resolve())}
            default_name = Path(args.hf_dir).resolve().name
        else:
            from megasyne.checkpoint.dist import read_manifest, resolve

            ckpt = resolve(args.checkpoint)
            manifest = read_manifest(ckpt)
            tok = _tokenizer_dir(args, manifest)
            model = {"kind": "megasyne", "path": str(ckpt.resolve()), "load": args.load,
                     "iteration": manifest.get("iteration"), "tokenizer": str(tok.resolve())}
            default_name = Path(args.checkpoint).resolve().name
            if args.load == "export":
                from megasyne.checkpoint.hf_convert import megasyne_to_hf

                hf = megasyne_to_hf(ckpt, Path(tmp) / "hf", tokenizer_dir=tok,
                                    progress=not args.no_progress)
                scorer = hf_model_scorer(hf, dtype=dtype, **kw)
            else:
                import transformers

                scorer = megasyne_model_scorer(
                    ckpt, transformers.AutoTokenizer.from_pretrained(tok), dtype=dtype, **kw)
        results = evaluate(scorer, specs, name=args.name or default_name, model=model,
                           allow_code_execution=args.allow_code_execution)
    write_results(results, args.output)
    print(format_table([results]))
    print(f"\nwrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megasyne.eval.runner import compare, format_table, read_results

    try:
        if args.command == "run":
            return run(args)
        if args.command == "table":
            print(format_table([read_results(p) for p in args.results]))
            return 0
        table, _ = compare(read_results(args.before), read_results(args.after))
        print(table)
        return 0
    except MegasyneError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
