#!/usr/bin/env python
"""Score every document of a .bin/.idx dataset with a model; write per-document perplexity.

The result is the metadata field ``ppl`` (float32, one value per document) of the dataset's
sidecar, ready for a recipe source with ``order: "ascending:ppl"`` (the SynE curriculum)::

    # one process, a megasyne checkpoint (tools/convert_hf.py output) or an HF directory
    python tools/score_ppl.py --data-prefix out/en_web_text_document \\
        --checkpoint checkpoints/llama3_8b_megasyne --window 8192 --batch-size 4
    python tools/score_ppl.py --data-prefix out/en_web_text_document --hf-dir Meta-Llama-3-8B

    # all ranks of a node: TP2 x DP4; every DP replica takes different blocks of documents
    torchrun --nproc_per_node 8 tools/score_ppl.py --data-prefix ... --checkpoint ... --tp 2

A killed run continues where it stopped when started again with the same arguments (finished
blocks of --block-size documents are kept under <prefix>.meta/.<field>.partial/). Long documents
are read in --window token windows every --stride tokens (transformers' perplexity recipe; see
megasyne/syne/ppl.py). Prints the run report (also written to <prefix>.<field>.report.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-prefix", required=True, help="dataset prefix (<prefix>.bin/.idx)")
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--checkpoint", help="megasyne checkpoint (root with 'latest' or an iter_* dir)")
    m.add_argument("--hf-dir", help="Hugging Face model directory (scored with transformers)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (megasyne only)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (megasyne only)")
    p.add_argument("--virtual-pp", type=int, default=None,
                   help="interleaved pipeline stages per rank (megasyne only, with --pp >= 2)")
    p.add_argument("--field", default="ppl", help="metadata field to write (default ppl)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts "
                   "(default: --window; smaller gives later windows context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="windows per pipeline micro-batch (megasyne)")
    p.add_argument("--block-size", type=int, default=1024, help="documents per resumable block")
    p.add_argument("--prepend-id", type=int, default=None,
                   help="token id put before each document (e.g. BOS) so its first token is scored")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--attention", choices=("megatron", "sdpa", "eager"), default=None,
                   help="attention kernel (megasyne: megatron|sdpa, HF: eager|sdpa)")
    p.add_argument("--state-dir", default=None, help="where finished blocks wait (default "
                   "<prefix>.meta/.<field>.partial)")
    p.add_argument("--restart", action="store_true",
                   help="discard the blocks of an interrupted run made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--debug-kill-after-blocks", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megasyne.data.indexed_dataset import IndexedDataset
    from megasyne.errors import MegasyneError, report
    from megasyne.syne.ppl import ScoreConfig, ScoreError, run_score

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        cfg = ScoreConfig(prefix=args.data_prefix, field=args.field, window=args.window,
                          stride=args.stride, batch_size=args.batch_size,
                          block_size=args.block_size, prepend_id=args.prepend_id,
                          state_dir=args.state_dir, restart=args.restart,
                          progress=not args.no_progress,
                          kill_after_blocks=args.debug_kill_after_blocks)
        IndexedDataset(cfg.prefix)  # a missing or damaged dataset fails before a model loads
        if args.checkpoint:
            from megasyne.scorers import MegatronScorer

            if args.attention == "eager":
                raise ScoreError("--attention eager is for --hf-dir; use megatron or sdpa")
            scorer = MegatronScorer.from_checkpoint(
                args.checkpoint, tp=args.tp, pp=args.pp, virtual_pp=args.virtual_pp,
                dtype=dtype, micro_batch_size=args.micro_batch_size, attention=args.attention)
        else:
            from megasyne.scorers import HFScorer

            if args.tp != 1 or args.pp != 1 or args.virtual_pp:
                raise ScoreError("--tp/--pp/--virtual-pp need a megasyne --checkpoint (convert the HF "
                                 "directory with tools/convert_hf.py)")
            if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
                raise ScoreError(f"--hf-dir {args.hf_dir}: no config.json there (a Hugging Face "
                                 f"model directory is expected)")
            scorer = HFScorer.from_dir(args.hf_dir, dtype=dtype,
                              attention=None if args.attention == "megatron" else args.attention)
        try:
            report = run_score(cfg, scorer)
        finally:
            scorer.close()
    except MegasyneError as exc:  # every rank reports: a damaged block may be one rank's own
        return report(exc)
    if report is not None:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
