"""Our fused RoPE of packed sequences (the thd slot, document masking) against Megatron-Core's
unfused ``_apply_rotary_pos_emb_thd``, forward and backward, under the interpreter."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

from megasyne.model.fusions import fused_rope_thd
from tests.kernels.test_rope import angles
from tests.kernels.tolerances import assert_close


class _OneRank:
    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_sequences_restart_at_zero(dtype):
    g = torch.Generator().manual_seed(5)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    t = torch.randn((sum(lengths), 3, 16), generator=g).to(dtype)          # [total, n, d]
    freqs = angles(max(lengths), 16)                                        # [max_s, 1, 1, r]
    dy = torch.randn(t.shape, generator=g).to(dtype)
    tk = t.clone().requires_grad_()
    y = fused_rope_thd(tk, cu, freqs)
    y.backward(dy)
    t64 = t.double().requires_grad_()
    y64 = _apply_rotary_pos_emb_thd(t64, cu, freqs.double(), cp_group=_OneRank())
    y64.backward(dy.double())
    assert y.shape == t.shape and y.dtype == dtype
    assert_close(y, y64, dtype=dtype, what="y")
    assert_close(tk.grad, t64.grad, dtype=dtype, what="dt")
    # the second call of a forward (k after q, or the next layer) reuses the packed angles
    assert torch.equal(fused_rope_thd(t, cu, freqs), y.detach())
    with pytest.raises(ValueError, match="context parallelism"):
        fused_rope_thd(t, cu, freqs, cp_size=2)
