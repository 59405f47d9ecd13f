#!/usr/bin/env python
"""Surrogate ablations: a grid of small continual-pre-training runs and its results table.

    # every cell, one after another (torchrun per cell), then results.md / .csv / .png
    python tools/ablate.py --grid examples/surrogate/grid.yaml
    # the cells and their names, without running anything
    python tools/ablate.py --grid examples/surrogate/grid.yaml --list
    # a Slurm job array instead (task 0: the base model's evaluation, task i: cell i) ...
    python tools/ablate.py --grid examples/surrogate/grid.yaml --slurm
    # ... and the table once its tasks are done
    python tools/ablate.py --grid examples/surrogate/grid.yaml --table
    # start one cell over (its directory is renamed aside, never deleted)
    python tools/ablate.py --grid examples/surrogate/grid.yaml --restart-cell synth20-ascending

The grid file: megasyne/ablation/grid.py. A rerun skips finished cells and resumes an
interrupted one from its checkpoints; a cell whose definition changed since it ran is refused
(the message names the cell and the key). Exit status 2 on a grid, configuration or data error,
3 when a cell's training or evaluation fails.
"""

from __future__ import annotations

import argparse
import sys

import megasyne  # noqa: F401  (project convention: first import of every entry point)
from megasyne.errors import MegasyneError, TrainingError, one_line, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--grid", required=True, help="grid YAML (megasyne/ablation/grid.py)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the cells and exit")
    mode.add_argument("--slurm", action="store_true", help="write a Slurm job-array script, run nothing")
    mode.add_argument("--table", action="store_true", help="only (re)write the results table")
    mode.add_argument("--only", metavar="ENTRY", help="run one entry: base or a cell name (no table)")
    mode.add_argument("--only-index", type=int, metavar="I",
                      help="run entry I: 0 the base, i the i-th cell (a Slurm array task)")
    p.add_argument("--restart-cell", action="append", default=[], metavar="CELL",
                   help="set this cell's run aside and start it over (repeatable; 'base' too)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megasyne.ablation.grid import load_grid
    from megasyne.ablation.runner import entries, prepare, run_grid, write_slurm_script
    from megasyne.ablation.table import write_table

    try:
        grid = load_grid(args.grid)
        if args.list:
            for cell in grid.cells():
                print(f"{cell.index + 1:3d} {cell.name}  {cell.settings}")
            return 0
        if args.slurm:
            prepare(grid, restart=tuple(args.restart_cell))
            print(f"wrote {write_slurm_script(grid)} (sbatch it; then --table)")
            return 0
        if not args.table:
            only = args.only
            if args.only_index is not None:
                names = entries(grid)
                if not 0 <= args.only_index < len(names):
                    from megasyne.ablation.grid import GridError

                    raise GridError(f"--only-index {args.only_index}: the grid has entries 0..{len(names) - 1}")
                only = names[args.only_index]
            run_grid(grid, restart=tuple(args.restart_cell), only=only)
            if only is not None:
                return 0
        out = write_table(grid)
        print(out["markdown"].read_text(encoding="utf-8"))
        print(f"wrote {out['markdown']}, {out['csv']}"
              + (f", {out['png']}" if out["png"] else " (no PNG: matplotlib is not installed)"))
        return 0
    except MegasyneError as exc:
        if isinstance(exc, TrainingError):
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return 3
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
