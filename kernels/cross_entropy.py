"""Cross-entropy over a (possibly vocab-parallel) logits tensor, in Triton.

Per token (reduction none), with V the *global* vocabulary size, lse = log(sum_j exp(x_j)):

    loss = (1 - s) * (lse - x_t) + s * (lse - mean_j x_j) + z * lse^2,   s = ls * V / (V - 1)

which is Megatron-Core's label smoothing (mass ls spread over the V - 1 wrong classes, i.e.
``torch.nn.functional.cross_entropy(label_smoothing=s)``) plus PaLM's z-loss. Tokens whose
target is ``ignore_index`` get loss 0 and gradient 0. Targets must otherwise lie in [0, V):
they are not checked on the host (that would cost a device sync per call).

    dloss/dx_j = grad_out * (p_j * (1 + 2 z lse) - (1 - s) [j == t] - s / V),  p = softmax(x)

Memory: the logits tensor is CONSUMED. Forward reads it once (online log-sum-exp in fp32 over
vocab blocks, no fp32 copy of the logits); backward overwrites it in place with the gradient
and returns it, so no second logits-sized buffer is ever allocated (Megatron-Core's own
vocab-parallel loss also reuses its logits buffer). Do not use the logits after backward.

Reduction "sum" / "mean" on one rank (what Hugging Face / Liger-Kernel users call): when the
logits need a gradient, the FORWARD computes it (the upstream gradient of a scalar loss is
one number, so dlogits is known up to that factor) right after the log-sum-exp of the same row,
while the row is still in L2, and writes it in place; backward then only rescales the rows,
on the device, and only if the upstream gradient is not exactly 1 (no host sync, unlike
Liger's check). The logits are then consumed already by the forward. Across TP ranks the
log-sum-exp needs an all-reduce between the two passes, so sum/mean there use the per-token
path and a scalar upstream gradient.

Vocab parallel: each TP rank holds logits[..., rank*Vl:(rank+1)*Vl] and the global targets.
    phase 1 (kernel): per row, local max m_r, sum exp(x - m_r), sum x, x_t if t is local
    all-reduce MAX of m; rescale the local sums to the global max
    all-reduce SUM of [sum_exp, x_t, sum_x] (one stacked collective)
    loss from the global sums (elementwise on [N]); backward needs no communication.

Only torch, torch.distributed and triton are imported, so the module is usable alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

# Largest vocab block one program processes per loop step. On an H200 (16384 x 128256 bf16,
# fwd+bwd) 4096 / 8192 / 16384 are within 4% of each other and 32768 is 15% slower. Tests
# monkeypatch it to force several blocks with a masked tail at small V.
MAX_BLOCK_V = 8192
# Warps per program; None = by block size below (benchmarks/bench_kernels.py --sweep sets it).
NUM_WARPS = None


def _settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocab (shard) of ``n_cols`` columns."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    num_warps = 4 if block < 2048 else (8 if block < 8192 else 16)
    return block, NUM_WARPS or num_warps


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _online_lse_stats(row_ptr, n_cols, BLOCK_V: tl.constexpr):
    """One read of a row: (max m, sum exp(x - m), sum x), in fp32."""
    # Online log-sum-exp: running max m and sum d = sum exp(x - m), rescaled whenever the
    # max grows. The sum of logits feeds label smoothing.
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    d = 0.0
    sum_x = 0.0
    for off in range(0, n_cols, BLOCK_V):
        c = off + cols
        mask = c < n_cols
        x = tl.load(row_ptr + c, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    return m, d, sum_x


@triton.jit
def _ce_fwd_kernel(
    logits_ptr, logits_stride,   # [N, Vl] this rank's logits (Vl = V on one rank)
    target_ptr,                  # [N] int, global ids
    stats_ptr,                   # [4, N] fp32: max, sum exp(x - max), x_t, sum x (if not FINALIZE)
    loss_ptr, lse_ptr,           # [N] fp32 (if FINALIZE)
    n_rows, n_cols, vocab_start, ignore_index,
    smoothing, z_loss_weight, inv_vocab,
    FINALIZE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * logits_stride  # N * V exceeds 2^31 at 8B scale
    m, d, sum_x = _online_lse_stats(row_ptr, n_cols, BLOCK_V)  # the one pass over the row

    # Target logit: one scalar load, only when the target falls in this shard.
    t = tl.load(target_ptr + row).to(tl.int64)
    t_local = t - vocab_start
    is_local = (t_local >= 0) & (t_local < n_cols) & (t != ignore_index)
    x_t = tl.load(row_ptr + tl.where(is_local, t_local, 0), mask=is_local, other=0.0).to(tl.float32)

    if FINALIZE:
        lse = m + tl.log(d)
        loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - sum_x * inv_vocab)
        loss += z_loss_weight * lse * lse
        loss = tl.where(t == ignore_index, 0.0, loss)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
    else:
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + n_rows + row, d)
        tl.store(stats_ptr + 2 * n_rows + row, x_t)
        tl.store(stats_ptr + 3 * n_rows + row, sum_x)


@triton.jit
def _write_grad_row(row_ptr, n_cols, t_local, lse, g, smoothing, z_loss_weight, inv_vocab,
                    BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with g * dloss/dx (the row is read once more)."""
    cols = tl.arange(0, BLOCK_V)
    p_scale = 1.0 + 2.0 * z_loss_weight * lse   # d(z lse^2)/dx_j = 2 z lse p_j
    for off in range(0, n_cols, BLOCK_V):
        c = off + cols
        mask = c < n_cols
        x = tl.load(row_ptr + c, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        dx = p * p_scale - smoothing * inv_vocab - tl.where(c == t_local, 1.0 - smoothing, 0.0)
        tl.store(row_ptr + c, (dx * g).to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr, logits_stride,   # [N, Vl] in: logits, out: dloss/dlogits (in place)
    target_ptr,                  # [N] int, global ids
    lse_ptr,                     # [N] fp32, global log-sum-exp
    grad_ptr,                    # [N] fp32 upstream grad per token
    n_cols, vocab_start, ignore_index,
    smoothing, z_loss_weight, inv_vocab,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
    t = tl.load(target_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    # Ignored tokens get an all-zero gradient row: scale 0 (logits are finite, so no NaN).
    g = tl.where(t == ignore_index, 0.0, tl.load(grad_ptr + row).to(tl.float32))
    _write_grad_row(row_ptr, n_cols, t - vocab_start, lse, g, smoothing, z_loss_weight,
                    inv_vocab, BLOCK_V)


@triton.jit
def _ce_fwd_grad_kernel(
    logits_ptr, logits_stride,   # [N, V] in: logits, out: scale * dloss/dlogits (in place)
    target_ptr,                  # [N] int
    loss_ptr,                    # [N] fp32 per-token loss (the caller reduces it)
    scale_ptr,                   # [1] fp32: d(reduced loss)/d(token loss), 1 or 1/n_valid
    n_cols, ignore_index, smoothing, z_loss_weight, inv_vocab,
    BLOCK_V: tl.constexpr,
):
    # One rank, scalar reduction: loss and gradient in one program per row. The second read
    # of the row follows the first at once, so much of it comes from L2 rather than HBM.
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
    m, d, sum_x = _online_lse_stats(row_ptr, n_cols, BLOCK_V)
    t = tl.load(target_ptr + row).to(tl.int64)
    ignored = t == ignore_index
    x_t = tl.load(row_ptr + tl.where(ignored, 0, t)).to(tl.float32)
    lse = m + tl.log(d)
    loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - sum_x * inv_vocab)
    loss += z_loss_weight * lse * lse
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    g = tl.where(ignored, 0.0, tl.load(scale_ptr))
    _write_grad_row(row_ptr, n_cols, t, lse, g, smoothing, z_loss_weight, inv_vocab, BLOCK_V)


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_stride, n_cols, g_ptr, BLOCK_V: tl.constexpr):
    """grad[row] *= g for a scalar upstream gradient g; nothing at all when g == 1."""
    g = tl.load(g_ptr)
    if g != 1.0:
        row_ptr = grad_ptr + tl.program_id(0).to(tl.int64) * grad_stride
        cols = tl.arange(0, BLOCK_V)
        for off in range(0, n_cols, BLOCK_V):
            c = off + cols
            mask = c < n_cols
            x = tl.load(row_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(row_ptr + c, (x * g).to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------


def _flatten(logits: torch.Tensor, target: torch.Tensor):
    """[..., Vl] / [...] -> [N, Vl] (last dim contiguous, a view when possible) / [N]."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} leading shapes differ")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"cross_entropy: unsupported logits dtype {logits.dtype}")
    logits2 = logits.reshape(-1, logits.shape[-1])
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    return logits2, target.reshape(-1).contiguous()


def _smoothing(label_smoothing: float, vocab_size: int) -> float:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return label_smoothing * vocab_size / (vocab_size - 1) if label_smoothing > 0 else 0.0


def _launch_fwd(logits2, target1, outs, vocab_start, vocab_size, ignore_index, smoothing,
                z_loss_weight, finalize):
    """The forward kernel over logits2 [N, Vl]: ``outs`` = (stats, loss, lse)."""
    n_rows, n_cols = logits2.shape
    if n_rows > 0:
        block, num_warps = _settings(n_cols)
        _ce_fwd_kernel[(n_rows,)](logits2, logits2.stride(0), target1, *outs, n_rows, n_cols,
                                  vocab_start, ignore_index, smoothing, z_loss_weight,
                                  1.0 / vocab_size, FINALIZE=finalize, BLOCK_V=block,
                                  num_warps=num_warps)


def local_stats(logits2, target1, vocab_start, vocab_size, ignore_index, smoothing,
                z_loss_weight):
    """Phase 1 of the vocab-parallel forward on this rank's shard: [4, N] fp32 (local max,
    sum exp(x - max), x_t if t is local else 0, sum x), before any all-reduce."""
    stats = torch.empty((4, logits2.shape[0]), dtype=torch.float32, device=logits2.device)
    _launch_fwd(logits2, target1, (stats, stats, stats), vocab_start, vocab_size, ignore_index,
                smoothing, z_loss_weight, finalize=False)
    return stats


def ce_forward(logits2, target1, vocab_start, vocab_size, ignore_index, smoothing,
               z_loss_weight, group=None):
    """logits2 [N, Vl], target1 [N] -> (loss [N] fp32, lse [N] fp32); collectives on ``group``
    when it has more than one rank."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        loss = torch.empty(logits2.shape[0], dtype=torch.float32, device=logits2.device)
        lse = torch.empty_like(loss)
        _launch_fwd(logits2, target1, (loss, loss, lse), vocab_start, vocab_size, ignore_index,
                    smoothing, z_loss_weight, finalize=True)
        return loss, lse

    stats = local_stats(logits2, target1, vocab_start, vocab_size, ignore_index, smoothing,
                        z_loss_weight)
    local_max = stats[0]
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # Bring every rank's sum exp(x - m_r) to the common max, then one stacked SUM.
    sums = stats[1:]                                  # [3, N]: sum_exp, x_t, sum_x
    sums[0].mul_(torch.exp(local_max - global_max))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    sum_exp, x_t, sum_x = sums
    lse = global_max + torch.log(sum_exp)
    loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - sum_x / vocab_size)
    if z_loss_weight:
        loss = loss + z_loss_weight * lse * lse
    loss = loss.masked_fill(target1 == ignore_index, 0.0)
    return loss, lse


def ce_backward_(logits2, target1, lse, grad_out, vocab_start, vocab_size, ignore_index,
                 smoothing, z_loss_weight):
    """Overwrite logits2 [N, Vl] with dloss/dlogits scaled by grad_out [N]; returns logits2."""
    n_rows, n_cols = logits2.shape
    block, num_warps = _settings(n_cols)
    # A broadcast grad (from .sum() / .mean()) has stride 0: materialise [N] fp32.
    g = grad_out.reshape(-1).to(torch.float32).contiguous()
    if n_rows > 0:
        _ce_bwd_kernel[(n_rows,)](
            logits2, logits2.stride(0), target1, lse, g, n_cols, vocab_start, ignore_index,
            smoothing, z_loss_weight, 1.0 / vocab_size, BLOCK_V=block, num_warps=num_warps,
        )
    return logits2


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Per-token loss of [..., Vl] logits (a vocab shard on ``group`` or the whole vocab)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss_weight, group):
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        vocab_local = logits.shape[-1]
        vocab_start, vocab_size = rank * vocab_local, vocab_local * world  # Megatron's even split
        smoothing = _smoothing(label_smoothing, vocab_size)
        logits2, target1 = _flatten(logits, target)
        loss, lse = ce_forward(logits2, target1, vocab_start, vocab_size, ignore_index,
                               smoothing, float(z_loss_weight), group if world > 1 else None)
        # logits2 is a view of the caller's logits (or its contiguous copy): saved, not copied.
        ctx.save_for_backward(logits2, target1, lse)
        ctx.meta = (vocab_start, vocab_size, ignore_index, smoothing, float(z_loss_weight))
        ctx.logits_shape = logits.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits2, target1, lse = ctx.saved_tensors
        grad = ce_backward_(logits2, target1, lse, grad_loss, *ctx.meta)
        return grad.view(ctx.logits_shape), None, None, None, None, None


class ReducedCrossEntropyFunction(torch.autograd.Function):
    """Scalar (sum or mean over non-ignored tokens) loss on one rank, gradient computed in the
    forward (see the module docstring); backward rescales it only if needed."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss_weight, mean):
        vocab_size = logits.shape[-1]
        smoothing = _smoothing(label_smoothing, vocab_size)
        logits2, target1 = _flatten(logits, target)
        n_rows, n_cols = logits2.shape
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        if mean:  # on the device: no sync. 0 valid tokens -> NaN loss (as torch), zero grad
            n_valid = (target1 != ignore_index).sum().to(torch.float32)
            scale = (1.0 / n_valid).reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=logits.device)
        if n_rows > 0:
            block, num_warps = _settings(n_cols)
            _ce_fwd_grad_kernel[(n_rows,)](
                logits2, logits2.stride(0), target1, loss, scale, n_cols, ignore_index,
                smoothing, float(z_loss_weight), 1.0 / vocab_size, BLOCK_V=block,
                num_warps=num_warps,
            )
        ctx.save_for_backward(logits2)   # holds the gradient now
        ctx.logits_shape = logits.shape
        ctx.done = False
        return loss.sum() / n_valid if mean else loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        if ctx.done:
            raise RuntimeError("cross_entropy(reduction=sum/mean): backward can run only once "
                               "(the gradient was written in place of the logits)")
        ctx.done = True
        n_rows, n_cols = grad.shape
        if n_rows > 0:
            block, num_warps = _settings(n_cols)
            g = grad_loss.reshape(1).to(torch.float32).contiguous()
            _scale_rows_kernel[(n_rows,)](grad, grad.stride(0), n_cols, g, BLOCK_V=block,
                                          num_warps=num_warps)
        return grad.view(ctx.logits_shape), None, None, None, None, None


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
                  reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of logits [..., V] and target [...]: fp32 per-token losses [...]
    (reduction "none"), or their sum, or their mean over the non-ignored tokens.

    The logits tensor is consumed: backward overwrites it with its gradient ("none"), or
    already the forward does when a scalar reduction needs a gradient.
    """
    if reduction == "none":
        return CrossEntropyFunction.apply(logits, target, ignore_index, label_smoothing,
                                          z_loss_weight, None)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"cross_entropy: reduction must be none, sum or mean, got {reduction!r}")
    if torch.is_grad_enabled() and logits.requires_grad:
        return ReducedCrossEntropyFunction.apply(logits, target, ignore_index, label_smoothing,
                                                 z_loss_weight, reduction == "mean")
    losses = CrossEntropyFunction.apply(logits, target, ignore_index, label_smoothing,
                                        z_loss_weight, None)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor,
                                 tp_group=None, label_smoothing: float = 0.0,
                                 ignore_index: int = -100,
                                 z_loss_weight: float = 0.0) -> torch.Tensor:
    """Drop-in for ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``.

    logits_shard [..., V/tp] (Megatron: [s, b, V/tp]) holds this rank's contiguous vocab
    range; target [...] holds global ids; returns the fp32 loss [...] (Megatron: [s, b]).
    ``tp_group`` None or of size 1 is the plain kernel. The logits shard is consumed.

    Differences from Megatron-Core 0.16: label smoothing uses the global vocabulary (Megatron
    uses the shard's size and mean, so its smoothed loss differs between ranks when TP > 1);
    ``ignore_index`` tokens get loss 0 and no gradient; z-loss is available.
    """
    if isinstance(tp_group, (int, float)) and not isinstance(tp_group, bool):
        raise TypeError("vocab_parallel_cross_entropy: third argument is tp_group; pass "
                        "label_smoothing by keyword (Megatron's signature has it third)")
    return CrossEntropyFunction.apply(logits_shard, target, ignore_index, label_smoothing,
                                      z_loss_weight, tp_group)


__all__ = ["cross_entropy", "vocab_parallel_cross_entropy", "CrossEntropyFunction",
           "ReducedCrossEntropyFunction", "ce_forward", "ce_backward_", "local_stats"]
