"""Fused SwiGLU in Triton: ``y = silu(gate) * up`` on Megatron's concatenated fc1 output.

    x: [..., 2F]  = cat(gate, up) along the last dim (Megatron-Core's linear_fc1 with
                    gated_linear_unit; ``torch.chunk(x, 2, -1)`` gives gate, up)
    y: [..., F]   = gate * sigmoid(gate) * up

Backward, with sig = sigmoid(gate):
    d_gate = dy * up * sig * (1 + gate * (1 - sig))
    d_up   = dy * gate * sig
written into one [..., 2F] gradient, optionally *in place of x* (x is only kept for this
backward; the MLP wrapper uses that, like Liger-Kernel, to avoid a second fc1-sized buffer).

The unfused module (chunk, silu, multiply; and their backward) reads/writes the fc1 output
~5 times forward and ~8 times backward; here it is read once and y written once forward,
x and dy read once and the gradient written once backward. Math is fp32, rounded once.

Only torch and triton are imported, so the module is usable and testable alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per program. 1024 x (2 inputs) fp32 per program keeps registers low and gives
# R x F/1024 programs: enough to fill any GPU at training shapes.
BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(x_ptr, x_stride, y_ptr, y_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * x_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, dy_stride, x_ptr, x_stride, dx_ptr, dx_stride, n_cols,
                       BLOCK: tl.constexpr):
    # dx may alias x: each element is loaded before this same program overwrites it.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * x_stride
    dx_row = dx_ptr + row * dx_stride
    dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dy * silu
    tl.store(dx_row + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_row + n_cols + cols, d_up.to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] -> y [..., F] in x.dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {x.shape[-1]} must be even (cat of gate and up)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"swiglu: unsupported dtype {x.dtype}")
    x2 = _rows(x)
    n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if y.numel():
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            x2, x2.stride(0), y, y.stride(0), n_cols, BLOCK=BLOCK, num_warps=4)
    return y.view(*x.shape[:-1], n_cols)


def swiglu_backward(dy: torch.Tensor, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Gradient [..., 2F] of swiglu at x for dy [..., F]; in x's storage when ``inplace``
    (and x is a row-contiguous view), else a new tensor."""
    x2 = _rows(x)
    dy2 = _rows(dy)
    n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
    dx = x2 if inplace and x.is_contiguous() else torch.empty_like(x2)  # x2: a view of x then
    if dx.numel():
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            dy2, dy2.stride(0), x2, x2.stride(0), dx, dx.stride(0), n_cols, BLOCK=BLOCK,
            num_warps=4)
    return dx.view(x.shape)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace_grad):
        ctx.inplace_grad = inplace_grad
        ctx.save_for_backward(x)
        return swiglu_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if ctx.inplace_grad:
            # Triton's writes do not bump autograd's version counter: a second backward
            # (retain_graph) would silently read the gradient as if it were the input.
            if getattr(ctx, "done", False):
                raise RuntimeError("swiglu(inplace_grad=True): backward can run only once (the "
                                   "saved input was overwritten); use inplace_grad=False")
            ctx.done = True
        return swiglu_backward(dy, x, inplace=ctx.inplace_grad), None


def swiglu(x: torch.Tensor, inplace_grad: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = cat(gate, up)`` [..., 2F] -> [..., F].

    ``inplace_grad=True`` writes the backward's gradient into x's memory (x must not be used
    after the backward: true of Megatron's fc1 output, which only feeds this activation)."""
    return SwiGLUFunction.apply(x, inplace_grad)


__all__ = ["swiglu", "SwiGLUFunction", "swiglu_forward", "swiglu_backward"]
