"""Tokenizer worker processes of the preprocessor: a worker that dies fails the run at once.

``multiprocessing.Pool`` replaces a worker that dies (SIGKILL from the kernel's out-of-memory
killer, a crash in a tokenizer's native code) but never finishes the task that worker held: the
``get()`` on its result waits forever and the job hangs with no output and no exit. Here each
worker answers on its own pipe and the main process waits on those pipes *and* on the workers'
process sentinels, so a death is seen within milliseconds and raised as :class:`WorkerDied`,
naming the process and how it ended.

Dispatch: every worker has its own task pipe, fed by its own sender thread (a send blocks until the
worker reads, and a worker reads only between batches: sending from the main thread could deadlock
with a worker blocked on sending its result). A batch goes to the worker with the fewest batches
outstanding, so a slow batch does not hold up the others. Results carry their batch number; the
caller asks for them in submission order.

Testing hook (for the fault-injection tests only): with ``MEGASYNE_TESTING_KILL_WORKER_AT_BATCH=N``
in the environment, the worker that receives batch number N (0-based) sends itself SIGKILL, as the
OOM killer would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from multiprocessing.connection import wait

from megasyne.errors import DataError

KILL_AT_BATCH_ENV = "MEGASYNE_TESTING_KILL_WORKER_AT_BATCH"


class WorkerDied(DataError, RuntimeError):
    """A worker process ended while the run still needed it."""

    def __init__(self, pid: int, exitcode: int | None, lost: list[int]) -> None:
        self.pid, self.exitcode = pid, exitcode
        self.lost = lost  # numbers of the batches it held, never to be answered
        super().__init__(f"worker process {pid} {describe_exit(exitcode)}")


class WorkerFailed(DataError, RuntimeError):
    """A worker raised; the message carries its traceback."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its pipe but is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-exitcode} ({name})"
    return f"exited with status {exitcode}"


def _worker_main(init, work, spec, tasks, results) -> None:
    """Worker process: ``init(spec)``, then ``(n, work(payload))`` for each task until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    kill_at = int(os.environ.get(KILL_AT_BATCH_ENV, "-1"))
    n = None
    try:
        init(spec)
        while (task := tasks.recv()) is not None:
            n, payload = task
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            results.send((n, True, work(payload)))
    except (EOFError, BrokenPipeError):  # the main process is gone or stopped us
        return
    except DataError as exc:  # bad input found by the worker (a damaged file): raised as it is
        try:
            results.send((n, False, exc))
        except OSError:
            pass
    except BaseException:
        try:
            results.send((n, False, traceback.format_exc()))
        except OSError:
            pass


def _sender(conn, pending: queue.SimpleQueue) -> None:
    """Thread: forward tasks to one worker until None; a dead worker's pipe ends it quietly."""
    while True:
        task = pending.get()
        try:
            conn.send(task)
        except OSError:  # the worker died (its exit is reported through its sentinel)
            return
        if task is None:
            return


class WorkerPool:
    """``workers`` processes running ``work(payload)`` after ``init(spec)``; results by number.

    Use as a context manager: a clean exit stops the workers after their last task, an exception
    kills them. ``submit(n, payload)`` never blocks; ``result(n)`` blocks until batch n is done
    and raises :class:`WorkerDied` / :class:`WorkerFailed` as soon as any worker dies or fails.
    """

    def __init__(self, workers: int, init, work, spec, *, start_method: str | None = None) -> None:
        ctx = mp.get_context(start_method)
        self._closed = False
        self._procs, self._results, self._tasks = [], [], []
        try:
            for _ in range(workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, args=(init, work, spec, task_r, res_w),
                                   daemon=True, name="preprocess-worker")
                proc.start()
                # Only the worker keeps its ends: its death then reads as EOF / EPIPE here, and
                # workers forked later do not inherit them.
                task_r.close()
                res_w.close()
                self._procs.append(proc)
                self._results.append(res_r)
                self._tasks.append(task_w)
        except BaseException:
            self._kill()
            raise
        # Threads only after every fork: a forked child must not inherit a lock a thread holds.
        self._pending = [queue.SimpleQueue() for _ in range(workers)]
        self._senders = [threading.Thread(target=_sender, args=(c, q), daemon=True)
                         for c, q in zip(self._tasks, self._pending)]
        for t in self._senders:
            t.start()
        self._outstanding = [0] * workers
        self._owner: dict[int, int] = {}  # batch number -> worker index
        self._done: dict[int, object] = {}

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._kill()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def submit(self, n: int, payload) -> None:
        k = min(range(len(self._procs)), key=self._outstanding.__getitem__)
        self._outstanding[k] += 1
        self._owner[n] = k
        self._pending[k].put((n, payload))

    def result(self, n: int):
        while n not in self._done:
            sentinels = {p.sentinel: k for k, p in enumerate(self._procs)}
            conns = {c: k for k, c in enumerate(self._results)}
            for ready in wait(self._results + list(sentinels)):
                if ready in sentinels:  # a worker ended: every worker runs until close()
                    self._died(sentinels[ready])
                self._receive(conns[ready])
        return self._done.pop(n)

    def _receive(self, k: int) -> None:
        try:
            n, ok, value = self._results[k].recv()
        except (EOFError, OSError):
            self._died(k)
        if not ok:
            if isinstance(value, DataError):
                raise value
            raise WorkerFailed(f"worker process {self._procs[k].pid} failed:\n{value}")
        self._outstanding[self._owner.pop(n)] -= 1
        self._done[n] = value

    def _died(self, k: int) -> None:
        proc = self._procs[k]
        proc.join(timeout=5)
        raise WorkerDied(proc.pid, proc.exitcode, sorted(n for n, o in self._owner.items() if o == k))

    def close(self) -> None:
        """Let every worker finish its tasks and exit (all results were collected by then)."""
        for q in self._pending:
            q.put(None)
        for t in self._senders:
            t.join()
        for proc in self._procs:
            proc.join(timeout=30)
        self._kill()  # any worker that did not exit by now

    def _kill(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join()
        # The workers' pipe ends are closed now: a sender blocked in send() gets EPIPE and ends.
        for q in getattr(self, "_pending", ()):
            q.put(None)
        for t in getattr(self, "_senders", ()):
            t.join(timeout=5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for c in self._results + self._tasks:
            c.close()
