"""megasyne's _foreach multi-tensor ops against Megatron-Core's own local fallbacks and torch.

They replace megatron-core's no-apex fallbacks in the optimizer (grad norm, clipping, the fp32
master -> bf16 model weight copy): same results (to rounding), without a host sync per tensor
or a temporary per tensor.
"""

import pytest
import torch
from megatron.core import utils

from megasyne.megatron_patches import apply_multi_tensor_fallbacks
from megasyne.training import multi_tensor as mt

FLAG = torch.zeros(1, dtype=torch.int)


@pytest.fixture(autouse=True, scope="module")
def cpu_shims():
    """Megatron's fallbacks put their result on "cuda" and assert CUDA tensor types; the CPU
    shims (a no-op with CUDA) map those to the CPU, as in every CPU run."""
    from megasyne.megatron_patches import apply_cpu_shims

    apply_cpu_shims()


def tensors(seed, shapes=((5, 3), (7,), (1,), (64, 33))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(shapes)]


def test_l2norm_matches_megatron_and_torch():
    ts = tensors(0)
    ours, per = mt.multi_tensor_l2norm(2048 * 32, FLAG, [ts], False)
    theirs, _ = utils.local_multi_tensor_l2_norm(2048 * 32, FLAG, [ts], False)
    flat = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts]))
    assert ours.shape == (1,) and ours.dtype == torch.float32 and per is None
    assert ours.item() == pytest.approx(flat.item(), rel=1e-6)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    _, per = mt.multi_tensor_l2norm(2048 * 32, FLAG, [ts], True)
    assert per.tolist() == pytest.approx([torch.linalg.vector_norm(t).item() for t in ts],
                                         rel=1e-6)
    empty, _ = mt.multi_tensor_l2norm(2048 * 32, FLAG, [[]], False)
    assert empty.tolist() == [0.0]


def test_scale_copies_across_dtypes_and_scales_in_place():
    src = tensors(1)
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    ref = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    mt.multi_tensor_scale(0, FLAG, [src, dst], 1.0)          # master fp32 -> model bf16
    utils.local_multi_tensor_scale(0, FLAG, [src, ref], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(dst, ref))
    grads = tensors(2)
    want = [g * 0.25 for g in grads]
    ptrs = [g.data_ptr() for g in grads]
    mt.multi_tensor_scale(0, FLAG, [grads, grads], 0.25)      # clipping: in place
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
    assert [g.data_ptr() for g in grads] == ptrs
    out = [torch.empty_like(t) for t in src]
    mt.multi_tensor_scale(0, FLAG, [src, out], 3.0)           # separate lists
    assert all(torch.equal(o, s * 3.0) for o, s in zip(out, src))


def test_install_replaces_only_megatrons_fallbacks(monkeypatch):
    from megatron.core.optimizer import clip_grads, optimizer

    for module, name in ((clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
                         (optimizer, "multi_tensor_scale_impl")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)

    def apex_like(*args):  # stands for apex's / TE's kernel: must be kept
        raise AssertionError("not called")

    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", apex_like)
    replaced = apply_multi_tensor_fallbacks()
    assert clip_grads.l2_norm_impl is mt.multi_tensor_l2norm
    assert clip_grads.multi_tensor_scale_impl is mt.multi_tensor_scale
    assert optimizer.multi_tensor_scale_impl is apex_like
    assert replaced == ["megatron.core.optimizer.clip_grads.l2_norm_impl",
                        "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl"]
    assert apply_multi_tensor_fallbacks() == replaced                           # idempotent


def test_megatron_clipping_with_our_ops_matches_torch():
    """Megatron's clip_grad_by_total_norm_fp32 (run through our scale op) on parameters whose
    gradient norm exceeds the limit equals torch.nn.utils.clip_grad_norm_."""
    from megatron.core.optimizer import clip_grads

    apply_multi_tensor_fallbacks()
    params = [torch.nn.Parameter(t) for t in tensors(3)]
    ref = [torch.nn.Parameter(t.clone()) for t in tensors(3)]
    for p, r, g in zip(params, ref, tensors(4)):
        p.grad, r.grad = g.clone(), g.clone()
    total, _ = mt.multi_tensor_l2norm(0, FLAG, [[p.grad for p in params]], False)
    assert total.item() > 1.0
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total.item())
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
