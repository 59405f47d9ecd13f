"""The checkpoint writer's queue server (megatron_patches.writer_queue) keeps serving through a
job-wide SIGTERM (a cluster's preemption notice, which also reaches a rank's child processes)
and dies with its trainer when that is SIGKILLed. Without the patch megatron-core starts the
server itself and SIGTERM ends it: checked too, so the test shows the difference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tests.launch import REPO_ROOT

# A stand-in trainer: starts the queue server (ours, or megatron-core's own), prints its pid,
# sends a SIGTERM to it (as a job-wide signal would), then uses the queue and waits.
TRAINER = textwrap.dedent("""
    import os, signal, sys, time
    import megasyne  # noqa: F401
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megasyne.megatron_patches import writer_queue
    if sys.argv[1] == "patched":
        assert writer_queue.install() and not writer_queue.install()  # idempotent
    queue = fa._get_write_results_queue()
    pid = writer_queue.server_pid() if sys.argv[1] == "patched" else queue._manager._process.pid
    print(pid, flush=True)
    os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    try:
        queue.put("written"); print(queue.get(), flush=True)
    except OSError as exc:  # BrokenPipe / ConnectionRefused: the server is gone
        print("server gone:", type(exc).__name__, flush=True)
    time.sleep(600)
""")


def _start(mode: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, mode], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("mode", ["patched", "megatron"])
def test_queue_server_survives_sigterm_and_dies_with_its_trainer(mode):
    proc, server = _start(mode)
    try:
        line = proc.stdout.readline().strip()
        if mode == "megatron":  # the fault this patch exists for
            assert line.startswith("server gone"), line
            return
        assert line == "written", line + proc.stderr.read() if proc.poll() is not None else line
        assert psutil.Process(server).status() != psutil.STATUS_ZOMBIE
        proc.send_signal(signal.SIGKILL)  # the trainer dies hard: no clean-up runs
        proc.wait(timeout=30)
        assert _gone(server), f"queue server {server} outlived its SIGKILLed trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if psutil.pid_exists(server):
            os.kill(server, signal.SIGKILL)
