"""Rehearse a training run at its real size on one CPU, before renting its GPUs.

    python tools/plan_run.py --config examples/syne/llama3_8b_stage1.yaml --nodes 8 --gpus-per-node 8

Builds the recipe's real mixture index (stand-in datasets with real sizes for corpora not on
this machine), runs every check the run runs, builds each pipeline stage's model on the meta
device under a fake process group of the real world size, and prints the plan: memory per GPU
against the card's, steps and tokens per stage and per source, checkpoint cadence and size, and
the time to finish at a stated MFU. Writes ``plan.json`` and ``lr.png`` to --out. Exit status 2
(one line ``error: ...``) when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.errors import MegasyneError, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--card", default="H100", help="H100, H200 or A100 (memory, peak FLOP/s)")
    p.add_argument("--mfu", type=float, default=0.40, help="MFU assumed for the time estimate")
    p.add_argument("--out", default=None, help="directory for plan.json and lr.png")
    p.add_argument("--work-dir", default=None,
                   help="scratch for stand-in datasets and the index (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megasyne.planning import load_plan_config
    from megasyne.planning.plan import PlanOptions, plan
    from megasyne.planning.report import format_plan, plot_lr

    try:
        cfg, missing_init = load_plan_config(args.config, args.set,
                                             world_size=args.nodes * args.gpus_per_node)
        with tempfile.TemporaryDirectory(prefix="megasyne-plan-") as tmp:
            options = PlanOptions(card=args.card, mfu=args.mfu, work_dir=args.work_dir or tmp)
            result = plan(cfg, options, absent_init_checkpoint=missing_init)
    except MegasyneError as exc:
        return report(exc)
    print(format_plan(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {out / 'plan.json'} and {plot_lr(result, out / 'lr.png')}")
    return 0 if result["memory"]["fits"] else 2


if __name__ == "__main__":
    sys.exit(main())
