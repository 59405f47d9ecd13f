"""Continual pre-training of Llama-3 with megasyne.

    torchrun --nproc_per_node=2 pretrain_syne.py --config examples/tiny/train.yaml \
        --set parallel.tp=2 optim.lr=3e-4

A run is a YAML config (a model preset, a mixture/curriculum recipe, parallel layout,
optimizer and schedule) plus a few ``key=value`` overrides. Everything is validated
before any process group starts. Re-running the same command resumes from the newest
complete checkpoint in ``<run_dir>/checkpoints``.

Exit status: 0 when done; 2 on a configuration, data or checkpoint error (one line
``error: <message>`` on stderr, from rank 0); 3 when training aborts (too many non-finite
steps in a row).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_ABORTED = 3  # training started and diverged; a config, data or checkpoint error exits 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. parallel.tp=2 optim.lr=1e-5 train_steps=100")
    return parser.parse_args(argv)


# Warnings that megatron-core / torch print on every rank of every run and that say nothing
# actionable here: the fallback path is reported once by megasyne.model.accel.describe(),
# and DCP's deprecations concern megatron-core's own checkpoint code.
_QUIET = ("Transformer Engine and Apex are not installed", "Apex is not installed",
          "full scope is deprecated", "Please use DTensor instead",
          "`load_state_dict` is deprecated", "When using async grad allreduce")


def main(argv=None) -> int:
    args = parse_args(argv)
    import re
    import warnings

    for text in _QUIET:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    import megasyne  # noqa: F401  (sets TRITON_INTERPRET on CPU before megatron imports)
    from megasyne.errors import MegasyneError, TrainingError, one_line, report

    # Every check that can fail runs on every rank (the config and layout before any process
    # group exists, the mixture index's status broadcast from rank 0, checkpoint manifests),
    # so all ranks fail alike and rank 0 alone says why: one line for the job.
    reporting = os.environ.get("RANK", "0") == "0"
    try:
        summary = _train(args)
    except MegasyneError as exc:
        if not isinstance(exc, TrainingError):
            return report(exc, show=reporting)
        aborted = exc
    else:
        if reporting:
            print(f"done: {summary}")
        return 0
    if reporting:
        print(f"error: training aborted: {one_line(aborted)}", file=sys.stderr, flush=True)
    return EXIT_ABORTED


def _train(args) -> dict:
    from megasyne.training.config import load_config

    cfg = load_config(args.config, args.set)  # fails fast, before megatron is imported
    from megasyne.parallel.init import destroy_parallel
    from megasyne.training.trainer import train

    try:
        return train(cfg)
    finally:
        destroy_parallel()


if __name__ == "__main__":  # guard required: the checkpoint writer re-imports __main__
    sys.exit(main())
