"""Fused RMSNorm (and residual-add + RMSNorm) in Triton, Llama / Megatron semantics.

    y = weight * (x * rsqrt(mean(x^2, -1) + eps))

computed entirely in fp32 and cast once to the input dtype (Megatron-Core / Transformer-Engine
semantics; Hugging Face's LlamaRMSNorm rounds x_hat to the input dtype *before* multiplying by
the weight, so the two differ by at most one ulp of the output dtype).

Layout: any leading shape, flattened to rows [R, H]; any hidden size H (masked power-of-two
block; above ``MAX_FUSED_BLOCK`` a looped two-pass variant). The last dim must be contiguous.

Forward saves only the per-row reciprocal RMS ``rrms`` (fp32, [R]) next to the inputs it must
keep anyway. Backward:
    x_hat = x * rrms,  g = dy * weight
    dx    = rrms * (g - x_hat * mean(g * x_hat, -1))
    dw    = sum_rows(dy * x_hat)
dw is reduced in two stages: each backward program owns a contiguous chunk of rows and writes
one fp32 partial row [P, H] (no atomics, deterministic); ``partial.sum(0)`` finishes it.

Sequence parallelism needs nothing here: the input is just this rank's rows, so dw is this
rank's partial sum. Megatron all-reduces it over the TP group because the module wrapper
(megasyne/model/norm.py) sets ``weight.sequence_parallel = True``.

Launch configuration: a forward program normalises ROWS rows at once ([ROWS, BLOCK] tile, the
weight loaded once per program instead of once per row); a backward program owns a chunk of
rows. Which (ROWS, warps) and (programs per SM, warps) is fastest depends on the card and H,
so on CUDA the first call per (H, dtype) times a few candidates and keeps the fastest
(``_pick``; MEGASYNE_TUNE=0 keeps the first = the previously profiled default).

Only torch and triton are imported, so the module is usable and testable alone.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Largest power-of-two block kept in registers for one row. 64K fp32 values per program is
# the practical ceiling (Liger uses the same); larger rows use the looped variant. Tests
# monkeypatch this to exercise the looped path at small sizes.
MAX_FUSED_BLOCK = 65536
# Loop block of the looped variant.
LOOP_BLOCK = 4096
# Candidates, first = default (used on CPU, with MEGASYNE_TUNE=0, and before tuning).
# Forward: (rows per program, warps). One row per program reloads the weight row from L2 for
# every row (as much L2 traffic as x itself at H = 4096); 2-4 rows per program share it.
FWD_CANDIDATES = [(1, None), (2, 8), (4, 8), (4, 16), (8, 16)]
# Backward: (programs per SM, warps, rows per loop step); each program owns a contiguous
# chunk of rows and one partial dw row. Profiled on an H200 (16384 x 4096 bf16, one row per
# step): 2/SM with 8 or 16 warps is best (~120 us, ~80% of copy bandwidth); 1/SM or 32 warps
# ~45% slower, 4-8/SM ~3% slower. Two rows per step are not measured yet.
BWD_CANDIDATES = [(2, None, 1), (2, 16, 1), (4, 8, 1), (1, 16, 1), (2, 16, 2), (1, 16, 2)]
# The largest [ROWS, BLOCK] tile a program may hold (fp32 values); candidates with more
# rows are skipped for that hidden size.
MAX_TILE = 32768
# Tests set a (name -> config) entry to force one candidate ("rmsnorm_fwd", "rmsnorm_bwd").
FORCE: dict[str, tuple] = {}
_CHOSEN: dict[tuple, tuple] = {}
# ms per candidate for every tuned key, for benchmarks to report.
TUNING_TIMINGS: dict[tuple, list] = {}


def _pick(name: str, key: tuple, candidates: list, launch, device: torch.device) -> tuple:
    """The launch configuration for (name, key). On CUDA the first call per key launches every
    candidate (warm-up, then 5 timed launches on CUDA events) and keeps the fastest. Candidates
    must be pure (same inputs, same outputs), as they all run on the caller's tensors.
    Elsewhere, or with MEGASYNE_TUNE=0, the first candidate."""
    if name in FORCE:
        return FORCE[name]
    if (name, key) in _CHOSEN:
        return _CHOSEN[(name, key)]
    if device.type != "cuda" or os.environ.get("MEGASYNE_TUNE", "1") == "0" or len(candidates) < 2:
        return candidates[0]
    timings = []
    for cand in candidates:
        launch(cand)  # compiles this variant
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            launch(cand)
        end.record()
        end.synchronize()
        timings.append((cand, start.elapsed_time(end) / 5))
    best = min(timings, key=lambda t: t[1])[0]
    _CHOSEN[(name, key)] = best
    TUNING_TIMINGS[(name, key)] = timings
    return best


def _settings(n_cols: int) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_PASS, num_warps) for a row of ``n_cols`` elements."""
    block = triton.next_power_of_2(n_cols)
    single = block <= MAX_FUSED_BLOCK
    if not single:
        block = min(LOOP_BLOCK, MAX_FUSED_BLOCK)
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, single, num_warps


def _fitting(candidates: list, block: int, rows_at: int) -> list:
    """The candidates whose rows (field ``rows_at``) x BLOCK fit MAX_TILE (one row always does)."""
    return [c for c in candidates if c[rows_at] == 1 or c[rows_at] * block <= MAX_TILE]


def fwd_candidates(n_cols: int) -> list:
    """Forward launch configurations the tuner may pick for rows of ``n_cols``: those that fit;
    the looped variant (rows wider than one tile) has only one row per program."""
    block, single, _ = _settings(n_cols)
    return _fitting(FWD_CANDIDATES, block, 0) if single else [(1, None)]


def bwd_candidates(n_cols: int) -> list:
    """Backward launch configurations for rows of ``n_cols``; the looped variant takes one row
    per step."""
    block, single, _ = _settings(n_cols)
    return (_fitting(BWD_CANDIDATES, block, 2) if single
            else [c for c in BWD_CANDIDATES if c[2] == 1])


def _num_bwd_programs(n_rows: int, device: torch.device, per_sm: int) -> int:
    """Programs of the backward: enough to fill the GPU, few enough that the [P, H] partial
    dw buffer and its final sum stay small next to the [R, H] tensors."""
    if device.type == "cuda":
        target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: cost is per row anyway; a few programs exercise the chunking
        target = 4
    return max(1, min(n_rows, target))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, x_stride,          # [R, H] input
    res_ptr, res_stride,      # [R, H] residual (read only if HAS_RES)
    h_ptr, h_stride,          # [R, H] x + residual, written if HAS_RES
    w_ptr,                    # [H]
    y_ptr, y_stride,          # [R, H] output
    rrms_ptr,                 # [R] fp32, saved for backward
    n_rows, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ROWS: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        # A [ROWS, BLOCK] tile: ROWS rows of this program, the weight loaded once for all.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        rows = rows.to(tl.int64)  # int64: R * H may exceed 2^31 elements
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        offs = cols[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + offs, mask=mask, other=0.0)
        if HAS_RES:
            # The residual stream is kept in the input dtype (as the unfused module does):
            # add in fp32, round once, store, and normalise the rounded value. (Explicit fp32:
            # the interpreter cannot do arithmetic on bf16, which it stores as uint16.)
            r = tl.load(res_ptr + rows[:, None] * res_stride + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None] * h_stride + offs, x, mask=mask)
        x = x.to(tl.float32)
        rrms = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)            # [ROWS]
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)   # [BLOCK]
        y = x * rrms[:, None] * w[None, :]
        tl.store(y_ptr + rows[:, None] * y_stride + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rrms_ptr + rows, rrms, mask=rmask)
    else:
        # Rows too wide for one tile (ROWS is 1): two passes over column blocks.
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        y_row = y_ptr + row * y_stride
        res_row = res_ptr + row * res_stride
        h_row = h_ptr + row * h_stride
        # Pass 1: sum of squares over column blocks (and the residual sum, stored once).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, n_cols, BLOCK):
            c = off + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(res_row + c, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
                tl.store(h_row + c, x, mask=mask)
            x = x.to(tl.float32)
            acc += x * x
        rrms = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        # Pass 2: normalise; re-read the (rounded) residual sum when there is one.
        for off in range(0, n_cols, BLOCK):
            c = off + cols
            mask = c < n_cols
            if HAS_RES:
                x = tl.load(h_row + c, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (x * rrms * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rrms_ptr + row, rrms)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr, dy_stride,        # [R, H] grad of y
    x_ptr, x_stride,          # [R, H] normalised input (x, or x + residual)
    w_ptr,                    # [H]
    rrms_ptr,                 # [R] fp32
    dres_ptr, dres_stride,    # [R, H] grad of the residual-sum output (if HAS_DRES)
    dx_ptr, dx_stride,        # [R, H] grad of x
    dw_part_ptr,              # [P, H] fp32 partial dw, one row per program
    n_rows, n_cols, rows_per_program,
    HAS_DRES: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    dw_row = dw_part_ptr + pid.to(tl.int64) * n_cols
    # Row pointers advance by their stride each iteration; the start offset is int64
    # because R * H may exceed 2^31 elements.
    first = row_start.to(tl.int64)
    dy_row = dy_ptr + first * dy_stride
    x_row = x_ptr + first * x_stride
    dres_row = dres_ptr + first * dres_stride
    dx_row = dx_ptr + first * dx_stride
    if SINGLE_PASS and ROWS > 1:
        # ROWS rows per loop step ([ROWS, BLOCK] tiles): more loads in flight per program.
        cmask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            rmask = rows < row_end
            r64 = rows.to(tl.int64)[:, None]
            mask2 = rmask[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + r64 * dy_stride + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + r64 * x_stride + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
            rrms = tl.load(rrms_ptr + rows, mask=rmask, other=0.0)[:, None]     # [ROWS, 1]
            x_hat = x * rrms
            g = dy * w[None, :]
            dx = (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None]) * rrms
            if HAS_DRES:
                dx += tl.load(dres_ptr + r64 * dres_stride + cols[None, :], mask=mask2,
                              other=0.0).to(tl.float32)
            tl.store(dx_ptr + r64 * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask2)
            dw_acc += tl.sum(dy * x_hat, axis=0)    # masked rows: dy = 0
        tl.store(dw_row + cols, dw_acc, mask=cmask)
    elif SINGLE_PASS:
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)  # stays in registers over the chunk
        for row in range(row_start, row_end):
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            rrms = tl.load(rrms_ptr + row)
            x_hat = x * rrms
            g = dy * w
            dx = (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols)) * rrms
            if HAS_DRES:
                dx += tl.load(dres_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat
            dy_row += dy_stride
            x_row += x_stride
            dres_row += dres_stride
            dx_row += dx_stride
        tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        # Rows too wide for registers: the partial dw row lives in global memory and is
        # updated by this program only (read-modify-write, still no atomics).
        for off in range(0, n_cols, BLOCK):
            c = off + cols
            tl.store(dw_row + c, tl.zeros([BLOCK], dtype=tl.float32), mask=c < n_cols)
        for row in range(row_start, row_end):
            rrms = tl.load(rrms_ptr + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, n_cols, BLOCK):  # pass 1: mean(g * x_hat)
                c = off + cols
                mask = c < n_cols
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                acc += dy * w * x
            mean_gx = tl.sum(acc, axis=0) * rrms / n_cols
            for off in range(0, n_cols, BLOCK):  # pass 2: dx and the dw partial
                c = off + cols
                mask = c < n_cols
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) * rrms
                w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                dx = (dy * w - x_hat * mean_gx) * rrms
                if HAS_DRES:
                    dx += tl.load(dres_row + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_row + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                part = tl.load(dw_row + c, mask=mask, other=0.0)
                tl.store(dw_row + c, part + dy * x_hat, mask=mask)
            dy_row += dy_stride
            x_row += x_stride
            dres_row += dres_stride
            dx_row += dx_stride


# --------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [R, H] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rmsnorm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"rmsnorm: unsupported input dtype {x.dtype}")


def rmsnorm_forward(x, weight, eps, residual=None):
    """x: [..., H] -> (y [..., H] in x.dtype, h [..., H] or None, rrms [R] fp32)."""
    _check(x, weight)
    shape = x.shape
    x2 = _rows(x)                                     # [R, H]
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rrms = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        if residual.shape != shape or residual.dtype != x.dtype:
            raise ValueError("add_rmsnorm: residual must have the shape and dtype of x")
        res2 = _rows(residual)
        h = torch.empty_like(y)
    else:
        res2 = h = x2  # placeholders, never touched (HAS_RES is a constexpr)
    block, single, num_warps = _settings(n_cols)
    w = weight if weight.is_contiguous() else weight.contiguous()
    has_res = residual is not None

    def launch(cfg):
        rows, warps = cfg if single else (1, None)
        _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x2, x2.stride(0), res2, res2.stride(0), h, h.stride(0), w, y, y.stride(0), rrms,
            n_rows, n_cols, eps, HAS_RES=has_res, BLOCK=block, SINGLE_PASS=single, ROWS=rows,
            num_warps=warps or num_warps,
        )

    if n_rows > 0:
        # Pure even with a residual: h = x + residual is rewritten, never read back here.
        launch(_pick("rmsnorm_fwd", (n_cols, x.dtype, has_res), fwd_candidates(n_cols),
                     launch, x.device))
    h_out = h.view(shape) if residual is not None else None
    return y.view(shape), h_out, rrms


def rmsnorm_backward(dy, x, weight, rrms, dres=None):
    """Returns (dx [..., H] in x.dtype, dweight [H] in weight.dtype).

    ``x`` is the tensor that was normalised (x + residual for the fused variant); ``dres``
    is the gradient flowing into that residual sum from elsewhere (added to dx).
    """
    shape = x.shape
    x2 = _rows(x)
    dy2 = _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    dres2 = _rows(dres) if dres is not None else dx
    block, single, num_warps = _settings(n_cols)
    w = weight if weight.is_contiguous() else weight.contiguous()
    partials = {}

    def launch(cfg):
        per_sm, warps, rows = cfg
        n_prog = _num_bwd_programs(n_rows, x.device, per_sm)
        rows_per_program = triton.cdiv(n_rows, n_prog)
        n_prog = triton.cdiv(n_rows, rows_per_program)  # no empty programs
        # Each program stores its whole partial row (no accumulation into old values), so
        # the buffer needs no zeroing and every candidate's launch is pure.
        part = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x.device)
        _rmsnorm_bwd_kernel[(n_prog,)](
            dy2, dy2.stride(0), x2, x2.stride(0), w, rrms, dres2, dres2.stride(0),
            dx, dx.stride(0), part, n_rows, n_cols, rows_per_program,
            HAS_DRES=dres is not None, BLOCK=block, SINGLE_PASS=single,
            ROWS=rows,
            num_warps=warps or num_warps,
        )
        partials["dw"] = part

    if n_rows == 0:
        return dx.view(shape), torch.zeros_like(weight)
    launch(_pick("rmsnorm_bwd", (n_cols, x.dtype, dres is not None), bwd_candidates(n_cols),
                 launch, x.device))
    dw_partial = partials["dw"]
    # Stage 2 of the dw reduction: [P, H] -> [H], in fp32, then one rounding.
    dw = dw_partial.sum(0).to(weight.dtype)
    return dx.view(shape), dw


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rrms = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rrms)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rrms = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rrms)
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rrms = rmsnorm_forward(x, weight, eps, residual=residual)
        ctx.save_for_backward(h, weight, rrms)  # h (the residual sum) is an output anyway
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rrms = ctx.saved_tensors
        if dy is None:  # only the residual sum was used downstream
            dy = torch.zeros_like(h)
        dx, dw = rmsnorm_backward(dy, h, weight, rrms, dres=dh)
        # d(x + residual)/dx = d/dresidual = identity: both get the same gradient.
        return dx, dx, dw, None


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ([..., H]); output in x.dtype, math in fp32."""
    return RMSNormFunction.apply(x, weight, eps)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual; y = rmsnorm(h)``. Returns ``(y, h)``; h (the new residual
    stream) is rounded to x.dtype before it is normalised, exactly like the unfused pair."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)


__all__ = ["rmsnorm", "add_rmsnorm", "RMSNormFunction", "AddRMSNormFunction",
           "rmsnorm_forward", "rmsnorm_backward"]
