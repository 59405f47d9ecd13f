"""A tiny model trained with our Triton kernels (interpreter on CPU) matches torch's ops.

3 optimizer steps of tiny_debug (fp32) from the same weights on the same batches: once with
torch's RMSNorm and Megatron's vocab-parallel cross-entropy, once with megasyne's Triton
RMSNorm (every norm of the model) and cross-entropy; on 1 rank and at TP2 + sequence
parallel (vocab split over 2 ranks, norms on sequence shards). And once with torch's ops
and the weight-gradient accumulation fusion (megasyne/model/fusions.py) forced on.
"""

import pytest
import torch

from tests.launch import run_torchrun

WORKER = "tests/kernels/model_kernels_worker.py"


@pytest.mark.parametrize("layout, nproc", [("single", 1), ("tp2_sp", 2)])
def test_training_with_kernels_gives_the_losses_of_torch_ops(tmp_path, layout, nproc):
    run_torchrun(WORKER, nproc, tmp_path, layout, timeout=600)
    r = torch.load(tmp_path / f"{layout}.pt")
    # fp32 throughout; the kernels sum in another order than torch: measured within 1e-6.
    assert r["kernels"]["losses"] == pytest.approx(r["torch"]["losses"], abs=1e-5)
    assert r["kernels"]["grad_norms"] == pytest.approx(r["torch"]["grad_norms"], rel=1e-4)
    # Weight gradients accumulated inside the GEMM (gradient-accumulation fusion) instead of
    # by DDP's hook: the same training.
    assert r["wgrad"]["losses"] == pytest.approx(r["torch"]["losses"], abs=1e-5)
    assert r["wgrad"]["grad_norms"] == pytest.approx(r["torch"]["grad_norms"], rel=1e-4)
    assert r["torch"]["losses"][-1] < r["torch"]["losses"][0]  # it trains
