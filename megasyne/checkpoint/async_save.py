"""Asynchronous checkpoint saves: the state is snapshotted, written in the background while
training goes on, and published (checksums, manifest, rename, ``latest``) once written.

:class:`AsyncCheckpointer` writes exactly the checkpoint ``dist.save_checkpoint`` writes, in
three parts:

1. ``start`` (collective, blocks training): the ``.tmp`` directory, Megatron's sharded save
   plan (``dist_checkpointing.save(..., async_sharded_save=True)``: it writes ``common.pt`` at
   once and returns the shard writes as an ``AsyncRequest``), this rank's RNG file (via
   ``before_publish``), the manifest's fields (the hooks' state deep-copied: what they were
   at the save's step, not at its publication). Then the snapshot: with CUDA the tensors are
   copied to host memory (Megatron's ``preload_fn``); then a forked writer process gets
   them. On the CPU the fork itself is the snapshot: the child sees the memory of the
   moment of the fork (copy-on-write), whatever the optimizer does to it afterwards.
2. the writer process (one per rank) runs Megatron's file writer (which forks one process
   per file and reports the results through a ``multiprocessing`` Manager queue).
3. ``poll`` (collective, each step, does not wait): one all-reduce of "my writer is still
   running"; when no rank's writer is, the checkpoint is finalised: Megatron's finalisation
   (the ``.metadata`` of the shards, ``metadata.json``), then ``dist.publish``, the same
   checksums, manifest, rename, ``latest`` and pruning as a synchronous save. ``wait``
   does the same but blocks until the writers are done; the trainer calls it before the
   next save, at the end of training, at exit_at_step / SIGTERM stops and before a resume.

A crash (or SIGKILL) while a write is pending leaves ``iter_N.tmp`` behind and ``latest``
naming the previous checkpoint: nothing is published before every rank's files are
written. The next save removes the ``.tmp``, as after a crashed synchronous save. The
writer dies with its trainer process (``PR_SET_PDEATHSIG``): no orphan keeps writing into
a directory a relaunch reuses. A write that fails (a full disk) surfaces at finalisation
on every rank as a CheckpointError naming the checkpoint; the ``.tmp`` is removed and
``latest`` is unchanged.

Costs measured in BENCHMARKS.md. Host memory: with CUDA one host copy of the rank's state;
on the CPU the pages the optimizer changes while the write runs are copied by the kernel
(at most the state again). Megatron's Manager starts on the first save of a process
(2-5 s, a "spawn" process: the launcher needs an ``if __name__ == "__main__":`` guard,
which pretrain_syne.py has) and is reused by later saves, synchronous or not.
"""

from __future__ import annotations

import copy
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megasyne.checkpoint import dist as ckpt
from megasyne.parallel.init import comm_device

# Testing hook (TrainConfig.fault_slow_async_write): how long the writer of a marked step
# sleeps before writing, so a test can kill a run while that write is pending.
SLOW_WRITE_S = 300.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class _Pending:
    """One save between ``start`` and its publication."""

    root: Path
    final: Path
    tmp: Path
    fields: dict  # the manifest's entries but the checksums, as they were at the save's step
    keep_last: int | None
    finalize_fns: list  # Megatron's: shard metadata and metadata.json (collective)
    writer: object  # this rank's writer process (None when the rank has nothing to write)
    started: float


class AsyncCheckpointer:
    """At most one checkpoint in flight per process; every method is collective."""

    def __init__(self, *, log=print):
        self.pending: _Pending | None = None
        self.log = log

    def start(self, root: str | os.PathLike, iteration: int, chunks: list, *,
              model_config: dict, layout: dict, optimizer=None, extra: dict | None = None,
              keep_last: int | None = None, before_publish=None,
              slow_write: bool = False) -> float:
        """Begin saving; returns the seconds training was blocked. A save still in flight is
        finished (and published) first. ``slow_write``: the testing hook above."""
        from megatron.core import dist_checkpointing

        self.wait()
        t0 = time.perf_counter()
        root = Path(root)
        final, tmp = root / ckpt.iter_name(iteration), root / (ckpt.iter_name(iteration) + ".tmp")
        try:
            state = ckpt.prepare_save(root, tmp, chunks, optimizer)
            request = dist_checkpointing.save(state, str(tmp / "dist"),
                                              content_metadata=ckpt.DIST_OPT_METADATA,
                                              async_sharded_save=True)
            if before_publish is not None:
                before_publish(tmp)  # per-rank files (RNG) of this step, written now
            fields = ckpt.manifest_fields(iteration, model_config, layout, optimizer,
                                          copy.deepcopy(extra))
            writer = _start_writer(request, delay_s=SLOW_WRITE_S if slow_write else 0.0)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            error = ckpt.failed_save_error(exc, root, final, tmp)
            if error is not None:
                raise error from exc
            raise
        self.pending = _Pending(root, final, tmp, fields, keep_last, list(request.finalize_fns),
                                writer, time.perf_counter())
        return time.perf_counter() - t0

    def poll(self) -> Path | None:
        """Publish the checkpoint in flight if every rank's writer is done (never waits for a
        writer); returns its directory then, else None."""
        if self.pending is None:
            return None
        running = torch.tensor([1.0 if _alive(self.pending.writer) else 0.0], device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(running, op=dist.ReduceOp.MAX)
        if running.item():
            return None
        return self._finalise()

    def wait(self) -> Path | None:
        """Wait for the checkpoint in flight and publish it; returns its directory (None when
        there was none)."""
        if self.pending is None:
            return None
        if self.pending.writer is not None:
            self.pending.writer.join()
        return self._finalise()

    def abort(self) -> None:
        """Not collective: kill this rank's writer (after an error on some rank, where a
        collective could hang). The ``.tmp`` stays; ``latest`` names the previous checkpoint."""
        if self.pending is not None and self.pending.writer is not None:
            self.pending.writer.kill()
            self.pending.writer.join()
        self.pending = None

    def _finalise(self) -> Path:
        """Collective, once every writer has exited: Megatron's finalisation, then publish."""
        p, self.pending = self.pending, None
        try:
            if p.writer is not None:
                p.writer.join()
                if p.writer.exitcode != 0:
                    self.log(f"warning: the writer of {p.tmp} exited with code "
                             f"{p.writer.exitcode}; its results are checked next")
            for fn in p.finalize_fns:  # raises on every rank if any rank's write failed
                fn()
            ckpt.publish(p.root, p.final, p.tmp, p.fields, keep_last=p.keep_last)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            # Every rank is here (Megatron's finalisation and publish raise on all ranks), but
            # only rank 0 holds the failure's details: every rank reports rank 0's message.
            message = [_failure_message(exc, p)]
            if dist.is_initialized():
                dist.broadcast_object_list(message, src=0)
            raise ckpt.CheckpointError(message[0]) from exc
        self.log(f"saved checkpoint {p.final} (written in the background in "
                 f"{time.perf_counter() - p.started:.1f} s)")
        return p.final


def _failure_message(exc: BaseException, p: _Pending) -> str:
    """The ``.tmp`` removed (rank 0); what went wrong and which checkpoint stays the latest."""
    error = ckpt.failed_save_error(exc, p.root, p.final, p.tmp)
    if error is not None:
        return str(error)
    text = " ".join(str(exc).split())[:500]
    return (f"the background write of {p.final} failed ({type(exc).__name__}: {text}); "
            f"{ckpt.previous_checkpoint_note(p.root, p.final)}: training can resume from it")


def _alive(writer) -> bool:
    return writer is not None and writer.is_alive()


def _start_writer(request, *, delay_s: float):
    """This rank's writer process for Megatron's AsyncRequest (None when nothing to write)."""
    if request.async_fn is None:
        return None
    args = list(request.async_fn_args)
    if request.preload_fn is not None:
        # [rank, write_buckets, results_queue]: the buckets' tensors copied to host memory
        # (a no-op for CPU tensors, which the fork below snapshots).
        args[1] = request.preload_fn()
    ctx = torch.multiprocessing.get_context("fork")
    writer = ctx.Process(target=_write, args=(request.async_fn, args, request.async_fn_kwargs,
                                              os.getpid(), delay_s), daemon=False)
    writer.start()
    return writer


def _write(write_fn, args, kwargs, parent_pid: int, delay_s: float) -> None:
    """The writer process: die with the trainer, then Megatron's write."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: an orphan finishes its write, then exits
        pass
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)
    # The trainer's SIGTERM handler (Preemption) was inherited: keep writing on SIGTERM, the
    # trainer waits for this write before it exits.
    if delay_s:
        time.sleep(delay_s)
    write_fn(*args, **kwargs)


__all__ = ["AsyncCheckpointer"]
