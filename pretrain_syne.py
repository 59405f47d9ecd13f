"""Continual pre-training of Llama-3 with megasyne.

    torchrun --nproc_per_node=2 pretrain_syne.py --config examples/tiny/train.yaml \
        --set parallel.tp=2 optim.lr=3e-4

A run is a YAML config (a model preset, a mixture/curriculum recipe, parallel layout,
optimizer and schedule) plus a few ``key=value`` overrides. Everything is validated
before any process group starts. Re-running the same command resumes from the newest
complete checkpoint in ``<run_dir>/checkpoints``.
"""

from __future__ import annotations

import argparse
import sys


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
    from megasyne.training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"pretrain_syne.py: config error: {exc}", file=sys.stderr)
        return 2
    from megasyne.parallel.dims import ParallelConfigError
    from megasyne.training.trainer import TrainingAborted, train

    try:
        summary = train(cfg)
    except (ParallelConfigError, ConfigError) as exc:
        print(f"pretrain_syne.py: {exc}", file=sys.stderr)
        return 2
    except TrainingAborted as exc:
        print(f"pretrain_syne.py: training aborted: {exc}", file=sys.stderr)
        return 3
    finally:
        from megasyne.parallel.init import destroy_parallel

        destroy_parallel()
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"done: {summary}")
    return 0


if __name__ == "__main__":  # guard required: the checkpoint writer re-imports __main__
    sys.exit(main())
