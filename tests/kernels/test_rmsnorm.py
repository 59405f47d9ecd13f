"""Triton RMSNorm (and fused residual-add + RMSNorm) against a float64 torch reference.

Runs under the Triton interpreter on CPU: shapes are small but odd (hidden 7 and 1000,
rows 1, 33, 257) and the looped wide-row variant is forced by lowering MAX_FUSED_BLOCK.
"""

import pytest
import torch

from megasyne.kernels import rmsnorm as rms_mod
from megasyne.kernels.rmsnorm import add_rmsnorm, rmsnorm
from tests.kernels.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def reference(x, weight, eps=EPS):
    """Megatron / TE semantics in float64: weight * x * rsqrt(mean(x^2) + eps)."""
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def make(shape, dtype, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


def run_both(x, w, dy, eps=EPS):
    """Kernel and float64 reference: (y, dx, dw) for each."""
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm(xk, wk, eps)
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = reference(x64, w64, eps)
    y64.backward(dy.double())
    return (y, xk.grad, wk.grad), (y64, x64.grad, w64.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 7), (33, 1000), (257, 64)])
def test_forward_backward(rows, hidden, dtype):
    x, w, dy = make((rows, hidden), dtype)
    (y, dx, dw), (y64, dx64, dw64) = run_both(x, w, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y64, what="y")
    assert_close(dx, dx64, what="dx")
    assert_close(dw, dw64, what="dweight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_looped_variant_for_wide_rows(monkeypatch, dtype):
    """Rows wider than MAX_FUSED_BLOCK take the two-pass looped kernels (masked last block)."""
    monkeypatch.setattr(rms_mod, "MAX_FUSED_BLOCK", 256)
    block, single, _ = rms_mod._settings(1000)
    assert not single and block == 256
    x, w, dy = make((9, 1000), dtype, seed=1)
    (y, dx, dw), (y64, dx64, dw64) = run_both(x, w, dy)
    assert_close(y, y64, what="y")
    assert_close(dx, dx64, what="dx")
    assert_close(dw, dw64, what="dweight")


def test_leading_shape_and_noncontiguous_input():
    """[s, b, h] (Megatron layout, sequence-parallel shards are just fewer rows) and a
    transposed, non-contiguous input."""
    x, w, dy = make((5, 3, 40), torch.float32, seed=2)
    (y, dx, dw), (y64, dx64, dw64) = run_both(x, w, dy)
    assert y.shape == (5, 3, 40)
    assert_close(y, y64, what="y")
    assert_close(dx, dx64, what="dx")
    assert_close(dw, dw64, what="dweight")
    xt = x.transpose(0, 1)  # [3, 5, 40], not contiguous
    assert_close(rmsnorm(xt, w), reference(xt, w), what="y (transposed input)")


def test_weight_dtype_differs_from_input():
    """bf16 activations with an fp32 weight: output in bf16, dweight in fp32."""
    x, w, dy = make((17, 96), torch.bfloat16, seed=3, w_dtype=torch.float32)
    (y, dx, dw), (y64, dx64, dw64) = run_both(x, w, dy)
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(y, y64, what="y")
    assert_close(dx, dx64, what="dx")
    assert_close(dw, dw64, what="dweight")


def test_eps_and_saved_state():
    """A large eps changes the result (it is applied inside the sqrt), and only the fp32
    reciprocal RMS per row is saved besides the inputs."""
    x, w, dy = make((4, 33), torch.float32, seed=4)
    (y, _, _), (y64, _, _) = run_both(x, w, dy, eps=0.5)
    assert_close(y, y64, what="y eps=0.5")
    y, h, rrms = rms_mod.rmsnorm_forward(x, w, 0.5)
    assert h is None and rrms.dtype == torch.float32 and rrms.shape == (4,)
    assert_close(rrms, torch.rsqrt(x.double().pow(2).mean(-1) + 0.5), what="rrms")


def check_add_rmsnorm(x, r, w, dy, dh, what=""):
    """Fused (y, h) = (rmsnorm(x + r), x + r) and the gradients from both outputs into x, r
    and the weight, against the float64 reference."""
    xk, rk, wk = (t.clone().requires_grad_() for t in (x, r, w))
    y, h = add_rmsnorm(xk, rk, wk)
    torch.autograd.backward([y, h], [dy, dh])
    # The residual sum is rounded to the activation dtype, as the unfused pair does (within
    # one ulp: the interpreter truncates); the norm is then checked on the kernel's own h.
    assert_close(h, (x + r).double(), what="h = x + residual" + what)
    h64 = h.detach().double().requires_grad_()
    w64 = w.double().requires_grad_()
    y64 = reference(h64, w64)
    torch.autograd.backward([y64, h64], [dy.double(), dh.double()])
    assert_close(y, y64, what="y" + what)
    assert_close(xk.grad, h64.grad, what="dx" + what)
    assert_close(rk.grad, h64.grad, what="dresidual" + what)
    assert_close(wk.grad, w64.grad, what="dweight" + what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("max_block", [65536, 128], ids=["fused", "looped"])
def test_add_rmsnorm(monkeypatch, dtype, max_block):
    """(y, h) = (rmsnorm(x + r), x + r); gradients flow from both outputs into x and r."""
    monkeypatch.setattr(rms_mod, "MAX_FUSED_BLOCK", max_block)
    x, w, dy = make((13, 200), dtype, seed=5)
    r = torch.randn(13, 200, generator=torch.Generator().manual_seed(6)).to(dtype)
    dh = torch.randn(13, 200, generator=torch.Generator().manual_seed(7)).to(dtype)
    check_add_rmsnorm(x, r, w, dy, dh)


def test_add_rmsnorm_only_residual_output_used():
    x, w, _ = make((3, 10), torch.float32, seed=8)
    xk = x.clone().requires_grad_()
    r = torch.randn(3, 10)
    _, h = add_rmsnorm(xk, r, w)
    h.sum().backward()
    torch.testing.assert_close(xk.grad, torch.ones_like(x))


def test_errors():
    with pytest.raises(ValueError):
        rmsnorm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(TypeError):
        rmsnorm(torch.randn(2, 8).double(), torch.ones(8).double())


@pytest.mark.parametrize("fwd_cfg", rms_mod.FWD_CANDIDATES, ids=str)
@pytest.mark.parametrize("bwd_cfg", [rms_mod.BWD_CANDIDATES[0], (2, 16, 2), (1, 8, 4)], ids=str)
def test_every_launch_configuration_the_tuner_may_pick(monkeypatch, fwd_cfg, bwd_cfg):
    """Multi-row forward tiles (33 rows: the last tile is partly masked) and every backward
    chunking give the same results; and the fused residual variant with a multi-row tile."""
    monkeypatch.setitem(rms_mod.FORCE, "rmsnorm_fwd", fwd_cfg)
    monkeypatch.setitem(rms_mod.FORCE, "rmsnorm_bwd", bwd_cfg)
    x, w, dy = make((33, 100), torch.bfloat16, seed=9)
    (y, dx, dw), (y64, dx64, dw64) = run_both(x, w, dy)
    assert_close(y, y64, what="y")
    assert_close(dx, dx64, what="dx")
    assert_close(dw, dw64, what="dweight")
    r = torch.randn(33, 100, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    dh = torch.randn(33, 100, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    check_add_rmsnorm(x, r, w, dy, dh, what=" (residual)")


def test_tuner_times_candidates_once_per_key_and_defaults_off_cuda(monkeypatch):
    """Off CUDA the first (profiled default) candidate is used without launching any; FORCE
    and MEGASYNE_TUNE=0 take precedence on any device. (The timing path needs CUDA events:
    benchmarks/bench_kernels.py runs it on the GPU and reports what it chose.)"""
    launched = []
    cands = [(1, None), (2, 8), (4, 8)]
    assert rms_mod._pick("t", ("k",), cands, launched.append, torch.device("cpu")) == (1, None)
    assert launched == []
    monkeypatch.setitem(rms_mod.FORCE, "t", (4, 8))
    assert rms_mod._pick("t", ("k",), cands, launched.append, torch.device("cpu")) == (4, 8)
    monkeypatch.setenv("MEGASYNE_TUNE", "0")
    monkeypatch.delitem(rms_mod.FORCE, "t")
    assert rms_mod._pick("t", ("k",), cands, launched.append, torch.device("cuda")) == (1, None)
