"""Resumable block-wise work over the documents of a dataset (used by score_ppl and label_topics).

The documents ``[0, num_items)`` are cut into blocks of ``block_size``; each finished block is
saved on its own, atomically, as ``<state_dir>/block_<b>.npz``. A killed run restarted with the same
configuration skips the blocks already on disk; the pending ones are dealt round-robin to the
workers (DP ranks) that exist now, so a resume may use another number of ranks. ``run.json`` holds
the configuration the blocks were computed with; a restart with a different one is refused (mixing
two models' perplexities in one field would be silent corruption) unless ``restart=True``.

Layout::

    <state_dir>/run.json              {"format": "megasyne-blocks/1", "config": {...},
                                       "num_items": n, "block_size": B}
    <state_dir>/block_00000042.npz    arrays for items [42 B, 43 B), same names in every block
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megasyne.atomic import atomic_write
from megasyne.errors import MegasyneError, RecipeToolError

FORMAT = "megasyne-blocks/1"
_BLOCK_RE = re.compile(r"^block_(\d{8})\.npz$")


class BlockStateError(RecipeToolError, RuntimeError):
    """The state directory belongs to another run, or a block file is damaged (names the file)."""


class BlockStore:
    """Block files of one run under ``state_dir`` (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike, *, config: dict, num_items: int,
                 block_size: int, restart: bool = False, create: bool = True) -> None:
        if block_size < 1:
            raise BlockStateError(f"block size must be >= 1, got {block_size}")
        self.dir = Path(state_dir)
        self.config = json.loads(json.dumps(config))  # normalised (tuples -> lists)
        self.num_items, self.block_size = int(num_items), int(block_size)
        self.num_blocks = -(-self.num_items // self.block_size)
        run = {"format": FORMAT, "config": self.config, "num_items": self.num_items,
               "block_size": self.block_size}
        path = self.dir / "run.json"
        if restart and self.dir.exists() and create:
            shutil.rmtree(self.dir)
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise BlockStateError(f"{path}: not valid JSON ({exc}); delete {self.dir}") from None
            if old != run:
                diff = sorted(k for k in set(old.get("config", {})) | set(self.config)
                              if old.get("config", {}).get(k) != self.config.get(k))
                other = [k for k in ("format", "num_items", "block_size") if old.get(k) != run[k]]
                raise BlockStateError(
                    f"{path}: an interrupted run with another configuration left its state here "
                    f"(differs in {other + diff}); rerun it as it was, or pass --restart to "
                    "discard its finished blocks")
        elif create:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write((json.dumps(run, indent=2, sort_keys=True)
                                                   + "\n").encode()))

    def block_range(self, b: int) -> tuple[int, int]:
        """Items [start, stop) of block ``b``."""
        return b * self.block_size, min((b + 1) * self.block_size, self.num_items)

    def path(self, b: int) -> Path:
        return self.dir / f"block_{b:08d}.npz"

    def done_blocks(self) -> set[int]:
        if not self.dir.is_dir():
            return set()
        out = set()
        for name in os.listdir(self.dir):
            m = _BLOCK_RE.match(name)
            if m and int(m.group(1)) < self.num_blocks:
                out.add(int(m.group(1)))
        return out

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """This worker's share of the blocks not on disk (every worker must list before any saves)."""
        done = self.done_blocks()
        todo = [b for b in range(self.num_blocks) if b not in done]
        return todo[rank::world]

    def save(self, b: int, **arrays: np.ndarray) -> None:
        start, stop = self.block_range(b)
        for name, a in arrays.items():
            if a.shape[:1] != (stop - start,):
                raise BlockStateError(f"block {b}: array {name!r} has shape {a.shape}, "
                                      f"expected ({stop - start}, ...)")
        atomic_write(self.path(b), lambda f: np.savez(f, **arrays))

    def load(self, b: int) -> dict[str, np.ndarray]:
        path = self.path(b)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise BlockStateError(f"{path}: unreadable block file ({exc}); delete it to recompute") \
                from None

    def assemble(self) -> dict[str, np.ndarray]:
        """All blocks concatenated in item order (every block must be done)."""
        missing = [b for b in range(self.num_blocks) if b not in self.done_blocks()]
        if missing:
            raise BlockStateError(f"{self.dir}: blocks {missing[:10]} are not done")
        parts: dict[str, list] = {}
        for b in range(self.num_blocks):
            for k, v in self.load(b).items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def open_on_every_rank(state_dir: str | os.PathLike, *, rank: int, restart: bool = False,
                       **store_args) -> BlockStore:
    """Every rank's BlockStore of one run: rank 0 creates the state directory (with ``restart``,
    clears it first), then every rank opens it. Rank 0's refusal (a directory left by a run with
    another configuration, a damaged run.json) is raised on every rank: the others would
    otherwise wait at their next collective until a timeout, or torchrun stopped them. Every
    rank of the job must call it (under torch.distributed: every rank of the default group)."""
    import torch.distributed as dist

    error = None
    if rank == 0:
        try:
            BlockStore(state_dir, restart=restart, **store_args)
        except MegasyneError as exc:
            error = exc
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)  # also: no rank opens before rank 0 created
        error = box[0]
    if error is not None:
        raise error
    return BlockStore(state_dir, create=False, **store_args)


class KillAfterBlocks:
    """The hidden testing hook ``--debug-kill-after-blocks K`` of score_ppl and label_topics: a
    crash at a known point, the same on any number of ranks.

    Each rank calls :meth:`block_done` after each block it finishes; at the K-th, it waits at
    ``barrier`` (every rank of the job) and then SIGKILLs itself, so no clean-up of any kind
    runs. The barrier makes the blocks on disk exactly K per worker: a rank killed on its own
    would make torchrun stop the others at a random point, some of them mid-block. Every worker
    must reach its K-th block, or the others would wait at the barrier while it waits at its
    next collective; so a run where a worker has fewer than K pending blocks is refused up front
    (``error``: the tool's own error class). ``pending`` must be the same number on every rank
    (listed before any rank saves), so that every rank refuses or none does.
    """

    def __init__(self, blocks: int | None, *, pending: int, workers: int,
                 barrier: Callable[[], None], error: type[Exception]) -> None:
        self.blocks, self._barrier = blocks, barrier
        if blocks is None:
            return
        if blocks < 1:
            raise error(f"--debug-kill-after-blocks must be >= 1, got {blocks}")
        fewest = pending // workers  # blocks are dealt round-robin: the last workers get fewest
        if fewest < blocks:
            raise error(f"--debug-kill-after-blocks {blocks}: some of the {workers} workers (DP "
                        f"replicas) has only {fewest} of the {pending} pending blocks; pass at "
                        "most that many, or a smaller --block-size, or fewer ranks")

    def block_done(self, done: int) -> None:
        """``done``: blocks this rank has finished in this run (1 after its first)."""
        if done == self.blocks:
            self._barrier()
            os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["BlockStateError", "BlockStore", "KillAfterBlocks", "open_on_every_rank"]
