"""Tolerances of the kernel tests, per output dtype, against a float64 torch reference.

A check is  |out - ref| <= atol * max|ref| + rtol * |ref|  (elementwise).

- float32: (1e-6, 1e-5). All math is fp32; the observed error is ~1e-7 relative, the
  margin covers the fp32 reductions (sum of squares, log-sum-exp over 32K columns).
- bfloat16 / float16: rtol = the dtype's eps (+1e-5 for the fp32 math), i.e. ONE ulp of the
  output: ulp(v) = eps * 2^floor(log2|v|) <= eps * |v|. The kernel computes in fp32 and rounds
  once; on a GPU that is half an ulp, but the Triton interpreter truncates fp32 -> bf16
  instead of rounding, so a full ulp must be allowed. Inputs are the same low-precision
  values in the kernel and the reference, so input rounding does not count.
- atol (scaled by the tensor's largest magnitude) only covers values that sit near zero
  after cancellation (dx of RMSNorm) and fp16 subnormals.
Losses are always fp32 outputs, so they use the float32 row whatever the logits dtype.
"""

import torch

TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-6, torch.finfo(torch.bfloat16).eps + 1e-5),  # 7.8e-3
    torch.float16: (1e-6, torch.finfo(torch.float16).eps + 1e-5),    # 9.8e-4
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = ""):
    """Compare ``actual`` (any dtype) with a float64 ``expected`` under TOL[dtype or actual.dtype]."""
    atol, rtol = TOL[dtype or actual.dtype]
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    bound = atol * e.abs().max() + rtol * e.abs()
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements out of tolerance (atol={atol} x "
            f"max|ref|, rtol={rtol}); worst: got {a.flatten()[i].item():.8g}, expected "
            f"{e.flatten()[i].item():.8g}, max abs err {err.max().item():.3g}"
        )
