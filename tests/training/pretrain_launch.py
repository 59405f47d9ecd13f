"""Launch pretrain_syne.py from tests on 2 gloo ranks, optionally SIGKILLing it mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch import REPO_ROOT, free_port


def launch(root: Path, run: str, *overrides: str, kill_at_step: int | None = None,
           config: str = "base.yaml"):
    """Run pretrain_syne.py on 2 ranks; with kill_at_step, SIGKILL the whole job as soon as
    metrics.jsonl shows that step (the launcher and both ranks, like a lost node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "pretrain_syne.py",
           "--config", str(root / config), "--set", f"run_dir={root / run}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if kill_at_step is not None:
        metrics, deadline = root / run / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at_step:
                # torchrun starts each rank in its own session: kill the whole tree.
                import psutil

                tree = psutil.Process(proc.pid).children(recursive=True)
                for p in tree:
                    p.send_signal(signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def records(root: Path, run: str) -> list[dict]:
    return [json.loads(l) for l in (root / run / "metrics.jsonl").read_text().splitlines()]
