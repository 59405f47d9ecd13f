"""benchmarks/bench_kernels.py must run unchanged on the first GPU a session is lent: its CPU
dry run (Triton interpreter, tiny shapes) exercises every code path that does not need a
GPU: correctness checks of all four kernels, every implementation that imports here, the
per-direction bandwidth table, the JSON report."""

import json
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT

pytestmark = pytest.mark.slow


def test_bench_kernels_dry_run(tmp_path):
    out = tmp_path / "bench_kernels.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--dry-run",
                           "--no-compile", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report["correctness"]
    assert checks and all(c["ok"] for c in checks)
    assert {c["kernel"] for c in checks} == {"rmsnorm", "add_rmsnorm", "cross_entropy", "rope",
                                             "swiglu"}
    ours = {(r["kernel"], r["impl"]) for r in report["results"] if "fwd_bwd_ms" in r}
    for kernel in ("rmsnorm", "add+rmsnorm", "cross_entropy", "rope q+k", "swiglu"):
        assert (kernel, "megasyne triton") in ours, kernel
    assert ("cross_entropy", "megasyne triton (mean)") in ours
    assert ("rope q+k", "megatron-core unfused RoPE") in ours
    assert ("add+rmsnorm", "torch add + megasyne rmsnorm") in ours
    assert all({"fwd_gbs", "bwd_gbs", "gbs"} <= set(r) for r in report["results"]
               if "fwd_bwd_ms" in r)
