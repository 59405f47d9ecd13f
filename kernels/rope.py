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
    n_rows, batch, n_heads, rot_dim, half, pass_dim,
    BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per ROWS consecutive (position, batch) rows, every head of each: the angles
    # of a position are loaded once per row and reused by all n heads; several rows per
    # program keep the tile large when there are few heads (GQA keys: 4 or 8).
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None, None]   # [ROWS, 1, 1] row ids
    rmask = r < n_rows
    pos = (r // batch).to(tl.int64)
    bat = (r % batch).to(tl.int64)
    t_row = t_ptr + pos * t_s + bat * t_b                     # [ROWS, 1, 1] pointers
    o_row = o_ptr + pos * o_s + bat * o_b
    heads = tl.arange(0, BLOCK_N)[None, :, None]              # [1, BLOCK_N, 1]
    cols = tl.arange(0, BLOCK_H)[None, None, :]               # [1, 1, BLOCK_H]
    hmask = rmask & (heads < n_heads)
    cmask = rmask & (cols < half)
    mask = hmask & cmask

    c_row = pos * rot_dim + cols                              # [ROWS, 1, BLOCK_H]
    c1 = tl.load(cos_ptr + c_row, mask=cmask, other=0.0)
    s1 = tl.load(sin_ptr + c_row, mask=cmask, other=0.0)
    c2 = tl.load(cos_ptr + half + c_row, mask=cmask, other=0.0)
    s2 = tl.load(sin_ptr + half + c_row, mask=cmask, other=0.0)

    t_off = t_row + heads * t_n + cols                        # [ROWS, BLOCK_N, BLOCK_H]
    x1 = tl.load(t_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(t_off + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    o_off = o_row + heads * o_n + cols
    tl.store(o_off, y1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_off + half, y2.to(o_ptr.dtype.element_ty), mask=mask)

    if BLOCK_P > 0:  # columns past the rotary dimension are copied (gradient: identity)
        pcols = tl.arange(0, BLOCK_P)[None, None, :]
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


# Rotated values per program the launcher aims at ([ROWS, BLOCK_N, BLOCK_H] tile).
TILE = 2048
# Tests set (rows per program, warps) to force a launch shape (rows a power of two);
# None = ``_launch_shape``.
FORCE_LAUNCH: tuple[int, int] | None = None


def _launch_shape(row_tile: int, n_rows: int) -> tuple[int, int]:
    """(rows per program, warps) for a [BLOCK_N, BLOCK_H] tile per row.

    Rows: enough for ~TILE values per program (TinyLlama's queries, 32 x 32 per row: 2 rows;
    its 4 key heads, 4 x 32: 16 rows), never more than there are rows. Warps: so that each
    thread holds >= 8 values of the tile, which makes its loads and stores 16-byte vectors in
    bf16 (a fixed 4 warps gave TinyLlama's keys one value per thread and 2-byte scalar
    accesses: benchmarks/kernel_resources.py, sm_90 PTX). The interpreter gains too: it
    pays per program, and RoPE was half its time in the model tests at one row per program.
    """
    rows = max(1, min(TILE // row_tile, triton.next_power_of_2(n_rows)))
    return rows, max(1, min(16, rows * row_tile // 256))


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
    n_rows = s * b
    rows, num_warps = FORCE_LAUNCH or _launch_shape(block_n * block_h, n_rows)
    _rope_kernel[(triton.cdiv(n_rows, rows),)](
        t, t.stride(0), t.stride(1), t.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2),
        cos, sin, n_rows, b, n, rot_dim, half, d - rot_dim,
        BACKWARD=backward, ROWS=rows, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_P=block_p,
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
