"""Triton RoPE against Megatron-Core's own unfused RoPE evaluated in float64.

Interpreter on CPU, small odd shapes: heads 1, 3, 5; head dims 2, 10, 64; rotary dim smaller
than the head dim (pass-through columns); a query view cut out of a fused qkv tensor (not
contiguous); angles of real positions up to 4096 (large arguments of cos/sin).
"""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megasyne.kernels import rope as rope_mod
from megasyne.kernels.rope import rope, supported
from tests.kernels.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def angles(s, rot_dim, start=0, base=10000.0):
    """Megatron / Llama RoPE angles [s, 1, 1, r]: positions x inverse frequencies, halves equal."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    pos = torch.arange(start, start + s, dtype=torch.float64)
    f = torch.outer(pos, inv_freq)
    return torch.cat([f, f], dim=-1).float()[:, None, None, :]


def reference(t, freqs):
    """Megatron-Core's unfused bshd RoPE in float64 (cos/sin computed in float64 too)."""
    return _apply_rotary_pos_emb_bshd(t.double(), freqs.double())


def check(t, freqs, what=""):
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(t.shape, generator=g).to(t.dtype)
    tk = t.detach().clone().requires_grad_()
    y = rope(tk, freqs)
    y.backward(dy)
    t64 = t.detach().double().requires_grad_()
    y64 = reference(t64, freqs)
    y64.backward(dy.double())
    assert y.dtype == t.dtype and y.shape == t.shape and y.is_contiguous()
    assert_close(y, y64, dtype=t.dtype, what=f"{what} y")
    assert_close(tk.grad, t64.grad, dtype=t.dtype, what=f"{what} dt")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s,b,n,d,r", [(7, 3, 5, 10, 10), (33, 2, 3, 64, 64), (5, 1, 1, 2, 2),
                                       (9, 2, 3, 10, 6)])
def test_forward_backward(s, b, n, d, r, dtype):
    g = torch.Generator().manual_seed(s * 7 + n)
    t = (torch.randn((s, b, n, d), generator=g) * 1.5 + 0.2).to(dtype)
    check(t, angles(s, r), what=f"[{s},{b},{n},{d}] r={r}")


def test_large_positions_and_noncontiguous_query():
    """q and k cut from one fused [s, b, heads, d] projection (strided views, as Megatron's
    attention gets them) at positions 4000..4016: cos/sin of angles up to 4016 rad."""
    g = torch.Generator().manual_seed(3)
    s, b, d = 17, 2, 16
    qkv = torch.randn((s, b, 6, d), generator=g)
    q, k = qkv[:, :, :4], qkv[:, :, 4:]
    assert not q.is_contiguous() and not k.is_contiguous()
    freqs = angles(s, d, start=4000)
    check(q, freqs, what="q view")
    check(k, freqs, what="k view")


def test_cos_sin_are_reused_per_freqs_tensor_and_recomputed_when_it_changes():
    freqs = angles(6, 8)
    t = torch.randn(6, 1, 2, 8)
    y1 = rope(t, freqs)
    cached = rope_mod._cos_sin_cache
    rope(t, freqs)
    assert rope_mod._cos_sin_cache is cached          # same tensor, same version: reused
    freqs.mul_(2.0)                                     # changed in place: recomputed
    y2 = rope(t, freqs)
    assert rope_mod._cos_sin_cache is not cached
    assert_close(y2, reference(t, freqs), what="after in-place change")
    assert not torch.allclose(y1, y2)
    other = angles(6, 8) * 3                            # another tensor: recomputed
    assert_close(rope(t, other), reference(t, other), what="other freqs")


def test_unsupported_inputs_are_named():
    t = torch.randn(4, 2, 3, 8)
    assert supported(t, angles(4, 8)) is None
    assert "positions" in supported(t, angles(5, 8))
    assert "even" in supported(t, angles(4, 8)[..., :7])
    assert "batch" in supported(t, angles(4, 8).expand(4, 2, 1, 8))
    with pytest.raises(ValueError, match="rope: freqs has 5 positions"):
        rope(t, angles(5, 8))


def test_megatron_fused_slot_falls_back_for_interleaved():
    """Our function in Megatron-Core's fused-RoPE slot: the interleaved convention (not
    implemented by the kernel) is handed to Megatron-Core's unfused code."""
    from megasyne.model.fusions import fused_rope

    t = torch.randn(5, 2, 3, 8)
    freqs = angles(5, 8)
    assert_close(fused_rope(t, freqs), reference(t, freqs), what="non-interleaved")
    inter = _apply_rotary_pos_emb_bshd(t.double(), freqs.double(), rotary_interleaved=True)
    assert_close(fused_rope(t, freqs, interleaved=True), inter, what="interleaved")


@pytest.mark.parametrize("rows, warps", [(1, 4), (4, 1), (8, 2)])
def test_rows_per_program_with_a_partial_last_program(monkeypatch, rows, warps):
    """s x b = 21 rows: with 4 or 8 rows per program the last program is partly masked."""
    monkeypatch.setattr(rope_mod, "FORCE_LAUNCH", (rows, warps))
    g = torch.Generator().manual_seed(rows)
    t = torch.randn((7, 3, 3, 12), generator=g)
    check(t, angles(7, 8), what=f"rows={rows}")


@pytest.mark.parametrize("n, half, n_rows, expected", [
    (32, 32, 8192, (2, 8)),    # TinyLlama queries: 32 heads x 32 pairs per row
    (4, 32, 8192, (16, 8)),    # TinyLlama keys (4 groups)
    (32, 64, 16384, (1, 8)),   # Llama-3-8B queries
    (8, 64, 16384, (4, 8)),    # Llama-3-8B keys
    (4, 32, 3, (4, 2)),        # fewer rows than the target: one program, no empty rows
    (64, 64, 100, (1, 16)),    # a row wider than the target tile: one row, at most 16 warps
])
def test_launch_shape(n, half, n_rows, expected):
    assert rope_mod._launch_shape(n * half, n_rows) == expected
