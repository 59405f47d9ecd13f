#!/usr/bin/env python
"""Convert Hugging Face Llama checkpoints to megasyne checkpoints and back.

    # HF dir (config.json + safetensors / .bin, sharded or not) -> megasyne checkpoint root
    python tools/convert_hf.py hf-to-megasyne --hf-dir llama3-8b/ --output ckpt/llama3-8b
    # the same, written by a TP2 x PP2 job (relaunches itself under torchrun on 4 ranks)
    python tools/convert_hf.py hf-to-megasyne --hf-dir llama3-8b/ --output ckpt/l8 --tp 2 --pp 2
    # any checkpoint (converted or written by training; optimizer state ignored) -> HF dir
    python tools/convert_hf.py megasyne-to-hf --checkpoint runs/x/checkpoints \\
        --output out/llama3-8b-cpt --tokenizer-dir llama3-8b/ --dtype bf16

The megasyne checkpoint loads at any TP/PP (``pretrain_syne.py`` init_checkpoint, or
``megasyne.checkpoint.dist.load_checkpoint(root, chunks)``). One process converts tensor by
tensor: peak memory is about the largest tensor (the embedding), not the model.
See megasyne/checkpoint/hf_convert.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint.hf import DTYPES
from megasyne.checkpoint.hf_convert import (
    check_output,
    hf_to_megasyne,
    inspect_hf,
    megasyne_to_hf,
)
from megasyne.errors import MegasyneError, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megasyne", help="Hugging Face Llama dir -> megasyne checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json and weights")
    a.add_argument("--output", required=True, help="checkpoint root to create (iter_0000000/ + latest)")
    a.add_argument("--tp", type=int, default=1, help="write from a TP layout (torchrun, tp*pp ranks)")
    a.add_argument("--pp", type=int, default=1, help="write from a PP layout (torchrun, tp*pp ranks)")
    a.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="stored dtype (auto: the HF weights' dtype)")
    b = sub.add_parser("megasyne-to-hf", help="megasyne checkpoint -> Hugging Face Llama dir")
    b.add_argument("--checkpoint", required=True, help="checkpoint root (uses 'latest') or iter_* dir")
    b.add_argument("--output", required=True, help="HF directory to create")
    b.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
    b.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights dtype (auto: the checkpoint's)")
    b.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB, 500MB")
    b.add_argument("--hf-config", default=None,
                   help="config.json (or its dir) for non-architecture fields such as token ids; "
                        "default: the HF config a converted checkpoint carries")
    for sp in (a, b):
        sp.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier conversion wrote in --output (other files "
                             "there are kept)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.abspath(__file__), *argv]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    try:
        if args.command == "megasyne-to-hf":
            out = megasyne_to_hf(args.checkpoint, args.output, dtype=dtype,
                                 tokenizer_dir=args.tokenizer_dir,
                                 max_shard_size=args.max_shard_size, hf_config=args.hf_config,
                                 overwrite=args.overwrite, progress=not args.no_progress)
            print(f"wrote Hugging Face model {out}")
            return 0
        nproc = args.tp * args.pp
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            # Check everything here, in one process, before starting any rank.
            inspect_hf(args.hf_dir, tp=args.tp, pp=args.pp, dtype=dtype)
            check_output(Path(args.output), args.overwrite, inputs=(args.hf_dir,))
            return _relaunch_under_torchrun(nproc, argv)
        out = hf_to_megasyne(args.hf_dir, args.output, tp=args.tp, pp=args.pp, dtype=dtype,
                             overwrite=args.overwrite, progress=not args.no_progress)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"wrote megasyne checkpoint {out} (iteration 0, tp={args.tp}, pp={args.pp})")
        return 0
    except MegasyneError as exc:  # every rank checks the same inputs: rank 0 says it once
        return report(exc, show=int(os.environ.get("RANK", 0)) == 0)


if __name__ == "__main__":
    sys.exit(main())
