"""The CPU shims: inactive with CUDA, each one needed and working without it."""

import pytest
import torch

import megasyne  # noqa: F401
from megasyne.megatron_patches import apply_cpu_shims, cpu_shims

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_install_is_idempotent_and_scoped():
    assert apply_cpu_shims() is True
    assert apply_cpu_shims() is True
    from megatron.core.pipeline_parallel import schedules

    # Patched modules see CPU tensors for device="cuda" ...
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    # ... but the real torch is untouched for everyone else.
    assert torch.zeros is not schedules.torch.zeros
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_tensor_type_reports_cuda_name_only_inside_the_wrapped_megatron_calls():
    t = torch.zeros(2)
    assert t.type() == "torch.FloatTensor"
    with cpu_shims._cpu_tensors_report_cuda_type():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64  # conversions still work
    assert t.type() == "torch.FloatTensor"


def test_rng_tracker_forks_the_cpu_generator():
    apply_cpu_shims()
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.random.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is restored
    torch.manual_seed(1234)
    assert torch.equal(a, torch.rand(3))  # the forked stream is the seeded one


def test_tensor_cuda_is_identity_only_inside_the_tied_embedding_setup():
    apply_cpu_shims()
    from megatron.core.models.common.language_module.language_module import LanguageModule

    t = torch.zeros(2)
    with cpu_shims._tensor_cuda_is_identity():
        assert t.cuda() is t
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()
    assert getattr(LanguageModule.setup_embeddings_and_output_layer, "_megasyne_shim", False)
