"""benchmarks/step_profile.py (the training benchmark's step breakdown) and the CPU dry run of
benchmarks/bench_train_gpu.py with --profile, so both run unchanged on the next GPU."""

import json
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT
from tests.scripts import load_script

step_profile = load_script("benchmarks/step_profile.py")
OTHER, kernel_category, summarise = (step_profile.OTHER, step_profile.kernel_category,
                                     step_profile.summarise)


@pytest.mark.parametrize("name, category", [
    # kernel names as the CUDA profiler reported them on the H100 (BENCHMARKS.md run)
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("_rmsnorm_fwd_kernel", "megasyne triton"),
    ("_ce_fwd_grad_kernel", "megasyne triton"),
    ("_swiglu_bwd_kernel", "megasyne triton"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast / cat"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy / cast / cat"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float>>", OTHER),
    ("aten::mm", "gemm"),
])
def test_kernel_category(name, category):
    assert kernel_category(name) == category


def test_summarise_adds_up_and_reports_idle_time():
    rows = [("nvjet_a", 10, 60.0), ("nvjet_b", 5, 20.0), ("_rope_kernel", 44, 4.0),
            ("elementwise_kernel<Mul>", 300, 6.0), ("aten::mm", 3, 0.0)]  # a host-only row
    r = summarise(rows, wall_ms=100.0, top=2)
    assert r["busy_ms"] == pytest.approx(90.0) and r["idle_ms"] == pytest.approx(10.0)
    assert r["kernel_launches"] == 359
    assert list(r["categories"]) == ["gemm", OTHER, "megasyne triton"]
    assert r["categories"]["gemm"] == dict(ms=80.0, calls=15, kernels=2, share_of_step=0.8)
    assert [t["name"] for t in r["top"]] == ["nvjet_a", "nvjet_b"]


@pytest.mark.slow
def test_bench_train_dry_run_with_profile(tmp_path):
    out = tmp_path / "bench_train.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train_gpu.py", "--dry-run",
                           "--variants", "megasyne/torch,hf", "--profile", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"megasyne/torch", "hf"} and not report["errors"]
    for variant, r in report["results"].items():
        prof = r["profile"]
        assert prof["busy_ms"] > 0 and prof["wall_ms"] >= prof["busy_ms"] * 0.5, variant
        assert "gemm" in prof["categories"], (variant, prof["top"])
    assert "idle" in proc.stdout


def test_sync_sites_counts_the_synchronising_lines():
    import warnings

    sync_sites = step_profile.sync_sites
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn_explicit("called a synchronizing CUDA operation", UserWarning,
                                   "megasyne/training/step.py", 117)
        warnings.warn_explicit("called a synchronizing CUDA operation", UserWarning,
                               "megatron/core/optimizer/clip_grads.py", 99)
        warnings.warn_explicit("something else", UserWarning, "x.py", 1)
    assert sync_sites(caught) == dict(count=4, sites=["megasyne/training/step.py:117 x3",
                                                      "megatron/core/optimizer/clip_grads.py:99 x1"])
