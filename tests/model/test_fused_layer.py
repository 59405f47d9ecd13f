"""The attention residual add fused into the pre-MLP RMSNorm (megasyne/model/layer.py)
computes what Megatron-Core's TransformerLayer computes, and is what the model runs."""

import json
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT

# case -> (loss rel, grad rel) between the two paths: fp32 is the same arithmetic in another
# kernel (measured: identical). In bf16 the fused backward adds the residual gradient in fp32
# before one rounding while Megatron's path rounds dx to bf16 first, so gradients differ by
# bf16 rounding (measured ~1% in norm through 2 layers); the bf16 case is judged against an
# fp32 run of the same weights instead (test_bf16_fused_layer_is_as_close_to_fp32).
TOLERANCES = {"fp32": (1e-6, 1e-5), "fp32_full_recompute": (1e-6, 1e-5), "bf16": (1e-3, 3e-2)}


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run([sys.executable, "tests/model/fused_layer_worker.py"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(next(line for line in proc.stdout.splitlines()
                           if line.startswith("RESULT "))[len("RESULT "):])


@pytest.mark.parametrize("case", sorted(TOLERANCES))
def test_fused_layer_equals_megatron_layer(result, case):
    r = result[case]
    loss_tol, grad_tol = TOLERANCES[case]
    # Full recompute runs each layer's forward again in the backward.
    assert r["fused_calls"] == r["layers"] * (2 if "recompute" in case else 1), r
    assert r["megatron_calls"] == 0, r
    assert r["grads_nonzero"], r
    assert r["loss_rel"] <= loss_tol, r
    assert r["grad_rel"] <= grad_tol, r


def test_bf16_fused_layer_is_as_close_to_fp32(result):
    r = result["bf16"]
    # measured: fused 1.4e-2, Megatron's path 1.6e-2 (relative gradient error, worst tensor)
    assert r["fused_err_vs_fp32"] <= 1.1 * r["megatron_err_vs_fp32"], r
    assert r["megatron_err_vs_fp32"] < 0.05, r


def test_what_the_fused_path_does_not_cover_runs_megatrons_forward(result):
    r = result["reasons"]
    assert r["as built"] is None
    assert "dropout" in r["dropout"]
    assert "Triton RMSNorm" in r["torch norm"]
    assert "recomputation" in r["norm recompute"]
