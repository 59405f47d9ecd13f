"""Run a worker script under torchrun (gloo, CPU) from a test and fail loudly.

Each launch costs ~8 s of imports on 2 cores, so tests share launches: one worker
script checks several layouts and writes its results to a JSON file the test reads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600,
                 env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` local ranks; raise with the full log on failure (with
    ``check=False`` a failed job is returned, for tests of crashes)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: the rendezvous store binds port 0 and tells the ranks which port the
        # OS gave it; a port picked "free" beforehand raced with other processes (EADDRINUSE).
        "--standalone", f"--nproc_per_node={nproc}",
        str(script), *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")])
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"torchrun {script} timed out after {timeout}s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
        ) from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} exited {proc.returncode}\nstdout:\n{proc.stdout[-8000:]}\n"
            f"stderr:\n{proc.stderr[-8000:]}"
        )
    return proc
