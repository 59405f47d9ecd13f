"""Read the next steps' micro-batches on a background thread while the current step computes.

Step ``s`` reads global samples ``[s*G, (s+1)*G)`` (``megasyne.training.batches``): a pure
function of ``s`` and of the data's *version*. The version changes when a hook re-blends the
samples ahead (the adaptive topic mixture rewrites the index's per-sample arrays in place, from
the next step on): a batch read under an older version may hold the old mixture's samples, or a
mixture of old and new ones if it was being read during the re-blend, so it is thrown away
unread and read again. So the data of every step is exactly what a synchronous read at that
step gives, whatever ``depth`` is (tests/training/test_prefetch.py compares the two).

Why a thread and not ``torch.utils.data.DataLoader`` workers: the reads are numpy copies out of
memory-mapped ``.bin`` files and a few small torch ops, which run with the GIL released, so a
thread overlaps them with the step; worker processes would each hold a copy of the per-sample
arrays that the adaptive mixture changes in the trainer's process (re-applying every re-blend
in every worker), would pass every batch through shared memory, and would be forked from a
process that already runs CUDA and NCCL. One thread also keeps the reads in step order.

Errors of the reader are raised in the trainer's thread at the step that needs the data (a read
ahead that fails is not an error until its step comes; one of a stale version never is); the
exception names the step and its samples. ``close()`` cancels the reads not started and waits
for the one in flight (at most one step's read), so no thread outlives the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megasyne.errors import DataError, MegasyneError


class DataReadError(DataError, RuntimeError):
    """Reading a step's samples failed with an OS error (storage, a vanished or cut file)."""


@dataclass
class StepData:
    """What one step reads on this data-parallel rank."""

    step: int
    """The step (0-based: optimizer steps done before it)."""
    batch: list[dict]
    """The rank's micro-batches (``megasyne.training.batches.micro_batches``)."""
    crc: int
    """CRC32 of the rank's tokens (``megasyne.training.batches.batch_crc``)."""


class BatchPrefetcher:
    """Serves step ``s``'s :class:`StepData`, read up to ``depth`` steps ahead.

    ``read(step)`` builds a step's data (run on the background thread; on the caller's thread
    when ``depth`` is 0, which is the synchronous reading of before). ``end_step``: no step at
    or past it is read ahead (the run stops there). ``describe(step)`` says which samples a
    step reads, for errors.
    """

    def __init__(self, read: Callable[[int], StepData], *, depth: int, end_step: int,
                 describe: Callable[[int], str] = str):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.read, self.depth, self.end_step, self.describe = read, depth, end_step, describe
        self._pending: dict[int, tuple[int, Future]] = {}  # step -> (version, its read)
        self._pool: ThreadPoolExecutor | None = None
        if depth:
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megasyne-prefetch",
                                            initializer=_on_device, initargs=(device,))

    def get(self, step: int, version: int) -> tuple[StepData, float]:
        """Step ``step``'s data under data ``version``, and the seconds spent waiting for it."""
        t0 = time.perf_counter()
        if self._pool is None:
            try:
                return self.read(step), time.perf_counter() - t0
            except Exception as exc:
                raise self._explain(step, exc)  # noqa: B904 (the cause is set by _explain)
        self._discard(lambda s, v: s < step or v != version)
        self._schedule(step, version)  # this step, then `depth` more read while it computes
        _, future = self._pending.pop(step)
        try:
            data = future.result()
        except Exception as exc:
            raise self._explain(step, exc)  # noqa: B904 (the cause is set by _explain)
        return data, time.perf_counter() - t0

    def close(self) -> None:
        """Cancel the reads not started; wait for the one running (no thread left behind)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    @property
    def in_flight(self) -> list[int]:
        """The steps read ahead or being read (for tests and diagnostics)."""
        return sorted(self._pending)

    def _schedule(self, first: int, version: int) -> None:
        """Steps first .. first+depth (none at or past end_step, but always ``first``) queued
        in order: the one worker reads them in that order."""
        for s in range(first, max(first, min(first + self.depth, self.end_step - 1)) + 1):
            if s not in self._pending:
                self._pending[s] = (version, self._pool.submit(self.read, s))

    def _discard(self, stale: Callable[[int, int], bool]) -> None:
        """Drop reads of passed steps or older data versions: their results (and errors) are
        never looked at; those not started are cancelled, a running one finishes on its own."""
        for s in [s for s, (v, _) in self._pending.items() if stale(s, v)]:
            self._pending.pop(s)[1].cancel()

    def _explain(self, step: int, exc: Exception) -> Exception:
        """The reader's error, said at the step that needed it: an OS error becomes a
        DataReadError naming the step and its samples; any other keeps its type (a
        MegasyneError names its file already, a bug keeps its traceback) plus a note."""
        where = f"step {step + 1} (samples {self.describe(step)})"
        if isinstance(exc, OSError) and not isinstance(exc, MegasyneError):
            error = DataReadError(
                f"reading the data of {where} failed: {type(exc).__name__}: {exc}. Check that "
                f"the recipe's .bin/.idx files are readable (storage, mounts), then rerun the "
                f"same command: the run resumes from its last checkpoint")
            error.__cause__ = exc
            return error
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"while reading the data of {where}")
        return exc


def _on_device(device: int | None) -> None:
    """Pinned buffers are made on the reader thread: use the trainer's GPU there too, not a
    new context on GPU 0."""
    if device is not None:
        torch.cuda.set_device(device)


__all__ = ["BatchPrefetcher", "DataReadError", "StepData"]
