"""The results queue of megatron-core's checkpoint writer, served by a process that survives a
job-wide SIGTERM and dies with its trainer.

megatron-core's ``FileSystemWriterAsync`` (used by every torch_dist save, synchronous or not)
collects the write results through ``filesystem_async._results_queue``: a queue served by a
multiprocessing Manager that the first save starts with the "spawn" method and keeps for the
life of the process. Two faults follow:

- A cluster's preemption notice (Slurm's ``scancel``, a preemption grace period) sends SIGTERM
  to every process of the job, this server included. The trainer catches SIGTERM to save one
  last checkpoint, but that save then talks to a dead server and fails (BrokenPipeError /
  ConnectionRefusedError): the preemption loses the work since the last periodic save.
- A trainer killed with SIGKILL leaves its server behind (nothing stops it), one orphan per
  rank and launch.

So we start the server ourselves, before megatron-core would, with an initializer that ignores
SIGTERM (the trainer, which handles it, shuts the server down when it exits) and asks the
kernel for SIGKILL when the trainer dies (``PR_SET_PDEATHSIG``; Linux). The queue is the same
kind megatron-core makes (``Manager().Queue()``), so its writer code is unchanged.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import threading
from multiprocessing.managers import SyncManager

MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_manager: SyncManager | None = None  # ours, kept alive for the life of the process


def install() -> bool:
    """Fill megatron-core's results-queue slot with ours; True if this call filled it.

    Idempotent; a slot megatron-core already filled (a save ran before) is left alone. Must
    run in the main thread: the kernel's parent-death signal follows the thread that started
    the server, and a thread that ends would take the server with it."""
    global _manager
    import importlib

    module = importlib.import_module(MODULE)
    if module._results_queue is not None:
        return False
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the checkpoint writer's queue server must be started from the "
                           "main thread (its parent-death signal follows the starting thread)")
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_server_init, initargs=(os.getpid(),))
    _manager = manager
    module._results_queue = manager.Queue()
    return True


def server_pid() -> int | None:
    """The queue server's process id (None before :func:`install` started one)."""
    return _manager._process.pid if _manager is not None else None


def _server_init(parent_pid: int) -> None:
    """In the server process: keep serving through SIGTERM, die with the trainer."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: an orphan stays until killed
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)
