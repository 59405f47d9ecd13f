"""Triton SwiGLU against a float64 torch reference (silu(gate) * up on cat(gate, up)).

Interpreter on CPU: odd widths (F = 1, 7, 1000, 1500 > one program's block), leading
[s, b] shapes, a non-contiguous input, and the in-place gradient used by the model.
"""

import pytest
import torch
import torch.nn.functional as F

from megasyne.kernels import swiglu as swiglu_mod
from megasyne.kernels.swiglu import swiglu, swiglu_backward
from tests.kernels.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(x):
    gate, up = torch.chunk(x.double(), 2, dim=-1)
    return F.silu(gate) * up


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)      # gates over a wide range of silu
    dy = torch.randn((*shape[:-1], shape[-1] // 2), generator=g).to(dtype)
    return x, dy


def check(x, dy, inplace_grad=False, what=""):
    xk = x.detach().clone().requires_grad_()
    y = swiglu(xk * 1, inplace_grad=inplace_grad)   # "* 1": a non-leaf, as the fc1 output is
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = reference(x64)
    y64.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert_close(y, y64, dtype=x.dtype, what=f"{what} y")
    assert_close(xk.grad, x64.grad, dtype=x.dtype, what=f"{what} dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (33, 14), (5, 3, 2000), (4, 3000)])
def test_forward_backward(shape, dtype):
    x, dy = make(shape, dtype)
    check(x, dy, what=str(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_gradient_matches_and_reuses_the_input_memory(dtype):
    x, dy = make((9, 2, 22), dtype, seed=1)
    check(x, dy, inplace_grad=True, what="inplace")
    x2 = x.clone()
    dx = swiglu_backward(dy, x2, inplace=True)
    assert dx.data_ptr() == x2.data_ptr()               # no second fc1-sized buffer
    x64 = x.double().requires_grad_()
    reference(x64).backward(dy.double())
    assert_close(dx, x64.grad, dtype=dtype, what="inplace dx")


def test_inplace_gradient_refuses_a_second_backward():
    x = torch.randn(4, 10, requires_grad=True)
    y = swiglu(x * 1, inplace_grad=True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        y.sum().backward()
    z = swiglu(x * 1)                      # the default keeps the input: twice is fine
    z.sum().backward(retain_graph=True)
    z.sum().backward()


def test_noncontiguous_input_and_small_block(monkeypatch):
    """A strided input (every other row) and several column blocks per row with a masked tail."""
    monkeypatch.setattr(swiglu_mod, "BLOCK", 16)
    x, dy = make((12, 2 * 37), torch.float32, seed=2)
    xs, dys = x[::2], dy[::2]
    assert not xs.is_contiguous()
    check(xs, dys, what="strided")
    check(xs, dys, inplace_grad=True, what="strided inplace")


def test_odd_last_dim_is_refused():
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.randn(3, 7))
