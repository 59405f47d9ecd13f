"""Running a grid: the base's evaluation, then every cell one after another, then the table.

Each cell is ``torchrun --standalone --nproc_per_node=<ranks> pretrain_syne.py --config
<output>/<cell>/train.yaml`` (a child process; output appended to ``<cell>/train.log``), then
its evaluation (``megasyne.ablation.evaluate``: in this process on a CPU, a child process with
CUDA; output in ``<cell>/eval.log``), then its done
marker ``<cell>/done.json``, written only after ``eval.json``. A rerun skips done cells and
relaunches the others: the trainer resumes from the cell's newest checkpoint by itself. A
launch that exits 0 without the trainer's ``run/complete.json`` was stopped before its end
(SIGTERM): the grid stops there too, to be rerun.

``--slurm`` writes ``<output>/ablate.sbatch`` instead: a job array whose task 0 evaluates the
base and task i runs cell i (the same command, ``tools/ablate.py --grid G --only-index i``);
``tools/ablate.py --grid G --table`` gathers the table once they are done.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megasyne.ablation.grid import BASE, Cell, Grid, GridError, base_documents, prepare_cell, set_aside
from megasyne.atomic import atomic_write_json, atomic_write_text
from megasyne.errors import TrainingError

REPO_ROOT = Path(__file__).resolve().parents[2]
DONE = "done.json"


class CellFailed(TrainingError, RuntimeError):
    """A cell's training or evaluation child process failed, or stopped before its end."""


def entries(grid: Grid) -> list[str]:
    """Everything a grid runs, in order: the base's evaluation, then the cells."""
    return [BASE, *(c.name for c in grid.cells())]


def prepare(grid: Grid, *, restart: tuple[str, ...] = (), log: Callable = print) -> list[Cell]:
    """Restart the named cells (their directories set aside), then write or check every cell's
    definition: a changed one is refused before anything runs."""
    cells = grid.cells()
    names = entries(grid)
    for name in restart:
        if name not in names:
            raise GridError(f"--restart-cell {name}: no such cell (cells: {names})")
        aside = set_aside(grid.output / name)
        if aside:
            log(f"{name}: previous run set aside as {aside}")
    base = base_documents(grid)
    for cell in cells:
        prepare_cell(grid, cell, base)
    _check_base(grid, base[0])
    return cells


def _check_base(grid: Grid, base_config: dict) -> None:
    """The base's evaluation is recorded with what it evaluated: refuse a changed one."""
    from megasyne.ablation.grid import definition_changes

    definition = json.loads(json.dumps({"checkpoint": base_config["init_checkpoint"],
                                        "evaluation": grid.evaluation.to_dict()}))
    record = grid.output / BASE / "base.json"
    if record.is_file():
        changes = definition_changes(json.loads(record.read_text(encoding="utf-8")), definition)
        if changes:
            raise GridError(f"cell {BASE}: its definition changed since it was evaluated ({record}): "
                            f"{'; '.join(changes[:3])}. Restore the grid, or rerun with "
                            f"--restart-cell {BASE}")
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, definition, indent=1)


def is_done(grid: Grid, name: str) -> bool:
    return (grid.output / name / DONE).is_file()


def run_grid(grid: Grid, *, restart: tuple[str, ...] = (), only: str | None = None,
             log: Callable = print) -> list[str]:
    """Run what is not done (every entry, or ``only`` one); returns the entries run now."""
    cells = {c.name: c for c in prepare(grid, restart=restart, log=log)}
    todo = entries(grid) if only is None else [only]
    if only is not None and only not in cells and only != BASE:
        raise GridError(f"no cell {only!r} in {grid.path} (cells: {list(cells)})")
    total, ran = len(cells), []
    for name in todo:
        done = sum(is_done(grid, c) for c in cells)
        label = "base model" if name == BASE else f"cell {cells[name].index + 1}/{total} {name}"
        if is_done(grid, name):
            log(f"[{done}/{total} cells done] {label}: done, skipped")
            continue
        log(f"[{done}/{total} cells done] {label}: {'evaluating' if name == BASE else 'training'}")
        t0 = time.time()
        if name != BASE:
            train_cell(grid, cells[name], log=log)
        evaluate_entry(grid, name)
        atomic_write_json(grid.output / name / DONE, {"entry": name, "seconds": round(time.time() - t0, 1),
                                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ran.append(name)
        log(f"[{sum(is_done(grid, c) for c in cells)}/{total} cells done] {label}: done "
            f"in {time.time() - t0:.0f} s")
    return ran


def _child_env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), path]) if path else str(REPO_ROOT))


def train_command(grid: Grid, cell: Cell) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={grid.ranks}", *grid.torchrun_args, str(REPO_ROOT / "pretrain_syne.py"),
            "--config", str(cell.dir / "train.yaml")]


def train_cell(grid: Grid, cell: Cell, *, log: Callable = print) -> None:
    """One cell's training, to the end of its plan (resuming from its checkpoints if any)."""
    from megasyne.training.trainer import COMPLETE_MARKER

    log_path = cell.dir / "train.log"
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(train_command(grid, cell))}\n")
        out.flush()
        rc = subprocess.call(train_command(grid, cell), cwd=REPO_ROOT, env=_child_env(), stdout=out,
                             stderr=subprocess.STDOUT)
    if rc != 0:
        raise CellFailed(f"cell {cell.name}: training exited with status {rc}; see {log_path} "
                         f"(last line: {_last_line(log_path)}). Rerun to resume it")
    if not (cell.run_dir / COMPLETE_MARKER).is_file():
        raise CellFailed(f"cell {cell.name}: training stopped before the end of its run (no "
                         f"{cell.run_dir / COMPLETE_MARKER}; preempted?); rerun to resume it")


def evaluate_entry(grid: Grid, name: str, *, in_process: bool | None = None) -> Path:
    """The entry's evaluation (``megasyne.ablation.evaluate.run_entry``); returns its eval.json.

    By default (``in_process=None``) it runs in this process when there is no CUDA device and
    in a child process otherwise. In this process, the scorer opens and closes its own 1-rank
    gloo group, what the evaluation prints goes to eval.log, and each entry is spared a fresh
    interpreter's torch and Megatron-Core imports (seconds per entry on a CPU). With CUDA, a
    child: a CUDA context cannot be released, and one left by this runner on a GPU would take
    memory from the next cell's training. Both paths write the same eval.json
    (tests/ablation/test_ablate_e2e.py compares them)."""
    out = grid.output / name / "eval.json"
    out.unlink(missing_ok=True)  # a stale one must not pass for this evaluation's result
    log_path = grid.output / name / "eval.log"
    if in_process is None:
        import torch

        in_process = not torch.cuda.is_available()
    status = _evaluate_here(grid, name, log_path) if in_process else _evaluate_in_child(grid, name, log_path)
    if status != 0 or not out.is_file():
        raise CellFailed(f"{name}: evaluation failed (status {status}); see {log_path} "
                         f"(last line: {_last_line(log_path)})")
    return out


def _evaluate_in_child(grid: Grid, name: str, log_path: Path) -> int:
    cmd = [sys.executable, "-m", "megasyne.ablation.evaluate", "--grid", str(grid.path), "--entry", name]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True)
    atomic_write_text(log_path, proc.stdout + proc.stderr)
    return proc.returncode


def _evaluate_here(grid: Grid, name: str, log_path: Path) -> int:
    """``python -m megasyne.ablation.evaluate``'s main() in this process: the same exit status
    (2 for a MegasyneError, 1 with the traceback for anything else) and output, into eval.log.
    The environment is restored afterwards (the evaluation's imports set variables, e.g.
    HF_DATASETS_OFFLINE), so that later cells' training children get this runner's own."""
    import contextlib
    import io
    import traceback

    from megasyne.ablation.evaluate import main as evaluate_main

    env, buf = dict(os.environ), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                status = evaluate_main(["--grid", str(grid.path), "--entry", name])
            except Exception:  # a bug: the traceback a child would have printed, then stop
                traceback.print_exc()
                status = 1
    finally:
        os.environ.clear()
        os.environ.update(env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(log_path, buf.getvalue())
    return status


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "<empty>"


def write_slurm_script(grid: Grid) -> Path:
    """A Slurm job array: task 0 the base's evaluation, task i (1..n) cell i, one node each."""
    n = len(grid.cells())
    tool = REPO_ROOT / "tools" / "ablate.py"
    directives = [f"--job-name=ablate-{grid.path.stem}", f"--array=0-{n}", "--nodes=1",
                  "--ntasks=1", f"--output={grid.output}/slurm-%A_%a.log", *grid.slurm]
    text = "\n".join([
        "#!/bin/bash",
        f"# Written by tools/ablate.py --slurm from {grid.path}: task 0 evaluates the base model,",
        f"# task i runs cell i of {n} ({', '.join(c.name for c in grid.cells())}), each with",
        f"# torchrun --nproc_per_node={grid.ranks}. Resubmitting reruns only what is not done.",
        "# Afterwards: " + shlex.join([sys.executable, str(tool), "--grid", str(grid.path), "--table"]),
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        'exec ' + shlex.join([sys.executable, str(tool), "--grid", str(grid.path)]) +
        ' --only-index "$SLURM_ARRAY_TASK_ID"',
        ""])
    grid.output.mkdir(parents=True, exist_ok=True)
    path = grid.output / "ablate.sbatch"
    atomic_write_text(path, text)
    path.chmod(0o755)
    return path


__all__ = ["CellFailed", "entries", "evaluate_entry", "is_done", "prepare", "run_grid",
           "train_cell", "train_command", "write_slurm_script"]
