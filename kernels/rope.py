"""Fused rotary position embedding (RoPE) in Triton, Megatron-Core / Llama semantics.

Megatron-Core's bshd layout and its non-interleaved ("rotate half") convention:

    t:     [s, b, n, d]   query or key heads (any strides, last dim contiguous)
    freqs: [s, 1, 1, r]   fp32 angles (position x inverse frequency), r <= d, r even
    f1, f2 = freqs[..., :r/2], freqs[..., r/2:]          (equal halves for standard RoPE)
    t1, t2 = t[..., :r/2], t[..., r/2:r]
    out[..., :r/2]  = t1 * cos(f1) - t2 * sin(f1)
    out[..., r/2:r] = t2 * cos(f2) + t1 * sin(f2)
    out[..., r:]    = t[..., r:]                          (pass-through, usually empty)

i.e. ``t * cos(freqs) + rotate_half(t) * sin(freqs)`` with ``rotate_half(t) = cat(-t2, t1)``
(megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd). The unfused
version costs ~8 full passes over q and k per layer (two products, the rotate_half ``cat``, a
sum, the pass-through ``cat``, and as many in backward) plus cos/sin of the angles at every
call; here it is one read and one write of t per direction.

Backward is the transpose of the same rotation:
    dt1 = dy1 * cos(f1) + dy2 * sin(f2)
    dt2 = dy2 * cos(f2) - dy1 * sin(f1)
so one kernel serves both directions (``BACKWARD`` flips the sign of the sine terms).

Math is fp32; the result is rounded once to t's dtype (the unfused path rounds cos/sin to t's
dtype first and every product after, so the two differ by about one ulp of bf16).

cos/sin of the angles are computed once per ``freqs`` tensor by torch (fp32, accurate range
reduction: angles reach s x 1 rad, far outside where fast GPU sin/cos approximations are
accurate) and reused by every layer of one forward (q and k, 2 x L calls) and by the backward.

Only torch and triton are imported, so the module is usable and testable alone.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    t_ptr, t_s, t_b, t_n,     # [s, b, n, d] input (or dy), last dim contiguous
    o_ptr, o_s, o_b, o_n,     # [s, b, n, d] output
    cos_ptr, sin_ptr,         # [s, r] fp32, contiguous
    batch, n_heads, rot_dim, half, pass_dim,
    BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One program per (position, batch) row: every head of that token, so the angles of the
    # position are loaded once and reused by all n heads.
    pid = tl.program_id(0)
    pos = (pid // batch).to(tl.int64)
    bat = (pid % batch).to(tl.int64)
    t_row = t_ptr + pos * t_s + bat * t_b
    o_row = o_ptr + pos * o_s + bat * o_b
    heads = tl.arange(0, BLOCK_N)[:, None]                   # [BLOCK_N, 1]
    cols = tl.arange(0, BLOCK_H)[None, :]                    # [1, BLOCK_H]
    hmask = heads < n_heads
    cmask = cols < half
    mask = hmask & cmask

    c1 = tl.load(cos_ptr + pos * rot_dim + cols, mask=cmask, other=0.0)           # [1, H]
    s1 = tl.load(sin_ptr + pos * rot_dim + cols, mask=cmask, other=0.0)
    c2 = tl.load(cos_ptr + pos * rot_dim + half + cols, mask=cmask, other=0.0)
    s2 = tl.load(sin_ptr + pos * rot_dim + half + cols, mask=cmask, other=0.0)

    x1 = tl.load(t_row + heads * t_n + cols, mask=mask, other=0.0).to(tl.float32)         # [N, H]
    x2 = tl.load(t_row + heads * t_n + half + cols, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(o_row + heads * o_n + cols, y1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + heads * o_n + half + cols, y2.to(o_ptr.dtype.element_ty), mask=mask)

    if BLOCK_P > 0:  # columns past the rotary dimension are copied (gradient: identity)
        pcols = tl.arange(0, BLOCK_P)[None, :]
        pmask = hmask & (pcols < pass_dim)
        xp = tl.load(t_row + heads * t_n + rot_dim + pcols, mask=pmask, other=0.0)
        tl.store(o_row + heads * o_n + rot_dim + pcols, xp.to(o_ptr.dtype.element_ty), mask=pmask)


# --------------------------------------------------------------------------------------
# Host launcher
# --------------------------------------------------------------------------------------

# One-entry cache: the freqs tensor of the current forward (weakly referenced, so a freed
# tensor whose address is reused can never hit) and its in-place version counter.
_cos_sin_cache: tuple | None = None


def _cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[s, r] fp32 cos and sin of ``freqs`` ([s, 1, 1, r]), reused while freqs is alive."""
    global _cos_sin_cache
    if _cos_sin_cache is not None:
        ref, version, cos, sin = _cos_sin_cache
        if ref() is freqs and version == freqs._version:
            return cos, sin
    f = freqs.reshape(freqs.shape[0], freqs.shape[-1]).float()
    cos, sin = torch.cos(f).contiguous(), torch.sin(f).contiguous()
    _cos_sin_cache = (weakref.ref(freqs), freqs._version, cos, sin)
    return cos, sin


def supported(t: torch.Tensor, freqs: torch.Tensor) -> str | None:
    """None if the kernel handles (t, freqs), else why not (the caller falls back)."""
    if t.dim() != 4 or freqs.dim() != 4:
        return "needs t [s, b, n, d] and freqs [s, 1, 1, r]"
    if freqs.shape[1] != 1 or freqs.shape[2] != 1:
        return f"freqs {tuple(freqs.shape)} varies over batch/heads"
    if freqs.shape[0] != t.shape[0]:
        return f"freqs has {freqs.shape[0]} positions, t has {t.shape[0]}"
    r = freqs.shape[-1]
    if r % 2 or r > t.shape[-1]:
        return f"rotary dim {r} must be even and <= head dim {t.shape[-1]}"
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {t.dtype}"
    return None


def rope_apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backward: bool = False) -> torch.Tensor:
    """Rotate t ([s, b, n, d]) by the [s, r] cos/sin tables (inverse rotation if backward);
    returns a new contiguous tensor of t's dtype."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    s, b, n, d = t.shape
    rot_dim = cos.shape[-1]
    half = rot_dim // 2
    out = torch.empty((s, b, n, d), dtype=t.dtype, device=t.device)
    if t.numel() == 0:
        return out
    block_h = triton.next_power_of_2(half)
    block_n = triton.next_power_of_2(n)
    block_p = triton.next_power_of_2(d - rot_dim) if d > rot_dim else 0
    # Warps so that each thread holds >= 8 values of the [BLOCK_N, BLOCK_H] tile: then its
    # loads and stores are 16-byte vectors in bf16. With a fixed 4 warps the key heads of
    # TinyLlama (4 x 32 tile) got 1 value per thread and compiled to 2-byte scalar accesses
    # (benchmarks/kernel_resources.py, sm_90 PTX); 1 warp gives 4 per thread there.
    tile = block_n * block_h
    num_warps = max(1, min(16, tile // 256))
    _rope_kernel[(s * b,)](
        t, t.stride(0), t.stride(1), t.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2),
        cos, sin, b, n, rot_dim, half, d - rot_dim,
        BACKWARD=backward, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_P=block_p,
        num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):  # inputs checked by the caller (``rope``, or ``supported``)
        cos, sin = _cos_sin(freqs)
        ctx.save_for_backward(cos, sin)   # [s, r] fp32 each: small next to t
        return rope_apply(t, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_apply(dy, cos, sin, backward=True), None


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------


def rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``t`` [s, b, n, d] with angles ``freqs`` [s, 1, 1, r] (Megatron-Core's
    non-interleaved convention). Output: new contiguous tensor, dtype of t."""
    reason = supported(t, freqs)
    if reason is not None:
        raise ValueError(f"rope: {reason}")
    return RoPEFunction.apply(t, freqs)


__all__ = ["rope", "RoPEFunction", "rope_apply", "supported"]
