"""benchmarks/kernel_resources.py: every Triton kernel compiles for an H100 (sm_90) here,
without a GPU, and the check really catches what the interpreter lets through."""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT
from tests.scripts import load_script

kernel_resources = load_script("benchmarks/kernel_resources.py")
Compiled, problems = kernel_resources.Compiled, kernel_resources.problems

OURS = {"_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel",
        "_ce_fwd_grad_kernel", "_scale_rows_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
        "_swiglu_bwd_kernel"}


def _env():
    # pytest has imported megasyne, which set TRITON_INTERPRET=1 (no CUDA): not for the child.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def test_every_kernel_and_launch_config_compiles_for_sm90(tmp_path):
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "kernel_resources.py"),
                           "--arch", "90", "--json", str(out)], env=_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    assert all(r["error"] is None and not r["problems"] for r in records)
    assert {r["kernel"] for r in records} == OURS
    assert all(r["arch"] == 90 and 0 < r["regs"] <= 255 for r in records)
    # Every RMSNorm launch-tuner candidate the model may pick was compiled, both directions,
    # with and without the fused residual.
    fwd = {(r["constexprs"]["ROWS"], r["num_warps"], r["constexprs"]["HAS_RES"])
           for r in records if r["kernel"] == "_rmsnorm_fwd_kernel" and r["case"].startswith("rmsnorm H=4096 bfloat16")}
    assert {(rows, has_res) for rows, _, has_res in fwd} == {(n, res) for n in (1, 2, 4, 8)
                                                            for res in (False, True)}
    bwd_rows = {r["constexprs"]["ROWS"] for r in records if r["kernel"] == "_rmsnorm_bwd_kernel"}
    assert bwd_rows == {1, 2}
    assert {r["constexprs"]["BACKWARD"] for r in records if r["kernel"] == "_rope_kernel"} == {False, True}
    assert any(r["constexprs"].get("FINALIZE") is False for r in records)   # vocab-parallel phase 1
    assert any(r["constexprs"].get("SINGLE_PASS") is False for r in records)  # looped RMSNorm


def _toy(mode):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "benchmarks" /
                                               "interpreter_only_kernels.py"), mode],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bugs_the_interpreter_runs_through_fail_to_compile():
    interpreted = _toy("interpret")
    assert interpreted["calls_plain_python"] == {"ok": True, "x0": 2.0}
    assert interpreted["loop_changes_type"] == {"ok": True, "x0": 16.0}
    compiled = _toy("compile")
    assert not compiled["calls_plain_python"]["ok"]
    assert "Unsupported function" in compiled["calls_plain_python"]["error"]
    assert not compiled["loop_changes_type"]["ok"]
    assert "Loop-carried variable acc" in compiled["loop_changes_type"]["error"]
    assert compiled["fine"]["ok"]
    recs = compiled["records"]
    assert recs["fine"]["error"] is None and recs["fine"]["regs"] > 0
    assert recs["calls_plain_python"]["error"] and recs["loop_changes_type"]["error"]


@pytest.mark.parametrize("arch, regs, local, shared, expected", [
    (90, 64, 0, 200 * 1024, []),
    (90, 64, 0, 228 * 1024, ["shared 233472 B > 232448 B"]),
    (80, 64, 0, 200 * 1024, ["shared 204800 B > 166912 B"]),
    (90, 64, 48, 0, ["spills: 48 B local memory per thread"]),
    (90, 256, 0, 0, ["256 registers > 255"]),
])
def test_problems(arch, regs, local, shared, expected):
    rec = Compiled("k", arch, "case", {}, 4, regs, local, shared)
    assert problems(rec) == expected
