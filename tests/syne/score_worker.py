"""torchrun worker for test_score_ppl.py (gloo; the test launches it on 4 ranks).

Usage: score_worker.py CHECKPOINT PREFIX NAME:TP:PP:BLOCK[:KILL] [...]
Scores PREFIX with the megasyne CHECKPOINT once per spec, at TP x PP (DP = world / (TP x PP)),
into the metadata field ``ppl_<NAME>``, with the library entry point the tool uses (window 48,
stride 32, 5 windows per batch, micro-batches of 2). A spec with KILL crashes the job (every
rank SIGKILLs itself once each DP replica has saved KILL blocks); it must come last. A run that
raises a MegasyneError prints ``rank R refused ppl_<NAME>: <message>`` and the next spec runs.
"""

import os
import sys

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.errors import MegasyneError
from megasyne.scorers import MegatronScorer
from megasyne.syne.ppl import ScoreConfig, run_score


def main(checkpoint: str, prefix: str, specs: list[str]) -> None:
    scorer = None
    for spec in specs:
        name, tp, pp, block, *kill = spec.split(":")
        scorer = MegatronScorer.from_checkpoint(checkpoint, tp=int(tp), pp=int(pp),
                                                micro_batch_size=2)
        try:
            run_score(ScoreConfig(prefix=prefix, field=f"ppl_{name}", window=48, stride=32,
                                  batch_size=5, block_size=int(block), progress=False,
                                  kill_after_blocks=int(kill[0]) if kill else None), scorer)
        except MegasyneError as exc:
            print(f"rank {os.environ['RANK']} refused ppl_{name}: {exc}", flush=True)
    if scorer is not None:
        scorer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
