"""Vocab-parallel cross-entropy on 2 ranks (gloo) equals Megatron-Core's
``tensor_parallel.vocab_parallel_cross_entropy`` and our single-rank kernel.

One torchrun launch (~10 s) runs every case; see vocab_parallel_worker.py.
"""

from pathlib import Path

import pytest
import torch

from tests.kernels.test_cross_entropy import reference
from tests.kernels.tolerances import TOL, assert_close
from tests.launch import run_torchrun

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    run_torchrun(WORKER, 2, out, timeout=300, env={"TRITON_INTERPRET": "1"})
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def close_pair(actual, expected, dtype, what, ulps=1):
    """Two finite-precision results of the same quantity: each may be 1 ulp off the truth."""
    atol, rtol = TOL[dtype]
    a, e = actual.double(), expected.double()
    bound = atol * e.abs().max() + (ulps * (rtol - 1e-5) + 1e-5) * e.abs()
    assert ((a - e).abs() <= bound).all(), f"{what}: max abs diff {(a - e).abs().max().item():.3g}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["fp32", "bf16", "fp32_smooth_z_ignore"])
def test_tp2_matches_single_rank_and_reference(ranks, case):
    for out in ranks:
        rec = out[case]
        lo, hi = out["shard"]
        dtype = rec["logits"].dtype
        loss_tp, grad_tp = rec["ours_tp"]
        loss_1, grad_1 = rec["ours_single"]
        assert loss_tp.shape == rec["target"].shape and grad_tp.shape[-1] == hi - lo
        # Every rank holds the full per-token loss, equal to the single-rank kernel's.
        assert_close(loss_tp, loss_1.double(), dtype=torch.float32, what=f"{case} loss TP2 vs TP1")
        close_pair(grad_tp, grad_1[..., lo:hi], dtype, f"{case} grad TP2 vs TP1", ulps=2)
        # ... and to the float64 reference on the full vocabulary.
        b64 = rec["logits"].double().requires_grad_()
        loss64 = reference(b64, rec["target"], **rec["kw"])
        loss64.backward(rec["grad"].double())
        assert_close(loss_tp, loss64.detach(), dtype=torch.float32, what=f"{case} loss vs float64")
        assert_close(grad_tp, b64.grad[..., lo:hi], what=f"{case} grad vs float64")


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["fp32", "bf16"])
def test_tp2_matches_megatron(ranks, case):
    for out in ranks:
        rec = out[case]
        dtype = rec["logits"].dtype
        loss_tp, grad_tp = rec["ours_tp"]
        loss_mg, grad_mg = rec["megatron_tp"]
        assert loss_mg.dtype == loss_tp.dtype == torch.float32
        assert loss_mg.shape == loss_tp.shape == rec["target"].shape
        assert_close(loss_tp, loss_mg.double(), dtype=torch.float32, what=f"{case} loss vs Megatron")
        # Megatron's fp32 grad is rounded to bf16 by autograd, ours in-kernel (the interpreter
        # truncates): each within one ulp of the truth, so two ulps apart at most.
        close_pair(grad_tp, grad_mg, dtype, f"{case} grad vs Megatron", ulps=2)


@pytest.mark.distributed
def test_label_smoothing_matches_megatron_tp1(ranks):
    rec = ranks[0]["tp1_smoothing"]
    (loss, grad), (loss_mg, grad_mg) = rec["ours"], rec["megatron"]
    assert_close(loss, loss_mg.double(), dtype=torch.float32, what="smoothed loss vs Megatron")
    assert_close(grad, grad_mg.double(), what="smoothed grad vs Megatron")
