"""Triton cross-entropy against a float64 torch reference (interpreter, CPU, small shapes).

Vocab 7, 1023 (odd, one block) and 32000 (several 8192-wide blocks, few rows); the
multi-block path with a masked tail is also forced at V=1023 by lowering MAX_BLOCK_V.
The loss is fp32 whatever the logits dtype; the gradient is in the logits dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from megasyne.kernels import cross_entropy as ce_mod
from megasyne.kernels.cross_entropy import cross_entropy, vocab_parallel_cross_entropy
from tests.kernels.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def reference(logits, target, ignore_index=IGNORE, label_smoothing=0.0, z_loss_weight=0.0):
    """Megatron-Core's smoothed loss (s = ls * V / (V - 1)) + z * lse^2, float64, per token."""
    x = logits.double()
    vocab = x.shape[-1]
    s = label_smoothing * vocab / (vocab - 1)
    lse = torch.logsumexp(x, -1)
    x_t = x.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (1 - s) * (lse - x_t) + s * (lse - x.mean(-1)) + z_loss_weight * lse**2
    return torch.where(target == ignore_index, torch.zeros_like(loss), loss)


def make(n, vocab, dtype, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g) + 0.5).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every and n > 1:
        target[1::ignore_every] = IGNORE
    grad = torch.rand(n, generator=g) + 0.5  # per-token upstream gradient, never 1
    return logits, target, grad


def run_both(logits, target, grad, **kw):
    """Kernel and reference: (loss, dlogits) each. The kernel consumes a clone of the logits."""
    base = logits.clone().requires_grad_()
    work = base.clone()  # non-leaf: becomes the gradient buffer
    loss = cross_entropy(work, target, **kw)
    loss.backward(grad)
    b64 = logits.double().requires_grad_()
    loss64 = reference(b64, target, **kw)
    loss64.backward(grad.double())
    return (loss, base.grad, work), (loss64, b64.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,vocab", [(1, 7), (33, 1023), (3, 32000)])
def test_forward_backward(n, vocab, dtype):
    logits, target, grad = make(n, vocab, dtype)
    (loss, dlogits, _), (loss64, dlogits64) = run_both(logits, target, grad)
    assert loss.dtype == torch.float32 and dlogits.dtype == dtype
    assert_close(loss, loss64, dtype=torch.float32, what="loss")
    assert_close(dlogits, dlogits64, what="dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ls,z", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)],
                         ids=["smoothing", "z-loss", "both"])
def test_label_smoothing_and_z_loss(ls, z, dtype):
    logits, target, grad = make(33, 1023, dtype, seed=1)
    kw = dict(label_smoothing=ls, z_loss_weight=z)
    (loss, dlogits, _), (loss64, dlogits64) = run_both(logits, target, grad, **kw)
    assert_close(loss, loss64, dtype=torch.float32, what="loss")
    assert_close(dlogits, dlogits64, what="dlogits")
    # The options really change the loss (guards against a silently ignored argument).
    assert (loss - cross_entropy(logits.clone(), target)).abs().max() > 1e-4


def test_smoothing_matches_torch_convention():
    """Our ls (Megatron's) is torch's label_smoothing = ls * V / (V - 1)."""
    logits, target, _ = make(16, 101, torch.float32, seed=2, ignore_every=5)
    ls, vocab = 0.1, 101
    ours = cross_entropy(logits.clone(), target, label_smoothing=ls)
    theirs = F.cross_entropy(logits.double(), target, ignore_index=IGNORE, reduction="none",
                             label_smoothing=ls * vocab / (vocab - 1))
    assert_close(ours, theirs, dtype=torch.float32, what="loss vs torch")


def test_multi_block_vocab_with_masked_tail(monkeypatch):
    monkeypatch.setattr(ce_mod, "MAX_BLOCK_V", 256)
    assert ce_mod._settings(1023)[0] == 256  # 4 blocks, the last one 255 wide
    logits, target, grad = make(9, 1023, torch.float32, seed=3)
    (loss, dlogits, _), (loss64, dlogits64) = run_both(logits, target, grad,
                                                       label_smoothing=0.1, z_loss_weight=1e-3)
    assert_close(loss, loss64, dtype=torch.float32, what="loss")
    assert_close(dlogits, dlogits64, what="dlogits")


def test_ignore_index_rows_are_zero():
    logits, target, grad = make(6, 50, torch.float32, seed=4, ignore_every=0)
    target[[0, 3]] = 7  # a custom ignore_index that is also a valid class id
    (loss, dlogits, _), (loss64, dlogits64) = run_both(logits, target, grad, ignore_index=7,
                                                       label_smoothing=0.1, z_loss_weight=1e-3)
    assert loss[0] == 0 and loss[3] == 0 and (loss[[1, 2, 4, 5]] > 0).all()
    assert (dlogits[[0, 3]] == 0).all()
    assert_close(loss, loss64, dtype=torch.float32, what="loss")
    assert_close(dlogits, dlogits64, what="dlogits")
    all_ignored = torch.full((6,), IGNORE)
    (loss, dlogits, _), _ = run_both(logits, all_ignored, grad)
    assert (loss == 0).all() and (dlogits == 0).all()


def test_megatron_layout_and_logits_consumed():
    """[s, b, V] logits and [s, b] targets -> [s, b] loss; backward writes the gradient into
    the logits buffer itself (no second logits-sized buffer)."""
    s, b, vocab = 4, 3, 257
    logits, target, grad = make(s * b, vocab, torch.bfloat16, seed=5)
    logits, target, grad = logits.view(s, b, vocab), target.view(s, b), grad.view(s, b)
    (loss, dlogits, work), (loss64, dlogits64) = run_both(logits, target, grad)
    assert loss.shape == (s, b)
    assert_close(loss, loss64, dtype=torch.float32, what="loss")
    assert_close(dlogits, dlogits64, what="dlogits")
    assert torch.equal(work, dlogits), "gradient is written in place of the logits"


def test_mean_reduction_broadcast_grad():
    """loss.mean().backward() hands backward a stride-0 grad; it must be materialised."""
    logits, target, _ = make(10, 64, torch.float32, seed=6, ignore_every=0)
    base = logits.clone().requires_grad_()
    cross_entropy(base.clone(), target).mean().backward()
    b64 = logits.double().requires_grad_()
    F.cross_entropy(b64, target).backward()
    assert_close(base.grad, b64.grad, what="dlogits (mean)")


def test_world_one_vocab_parallel_is_plain_kernel():
    logits, target, grad = make(8, 300, torch.float32, seed=7)
    a = vocab_parallel_cross_entropy(logits.clone(), target, None, label_smoothing=0.1)
    b = cross_entropy(logits.clone(), target, label_smoothing=0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError):  # Megatron's positional label_smoothing would land here
        vocab_parallel_cross_entropy(logits.clone(), target, 0.1)


def test_errors():
    with pytest.raises(ValueError):
        cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        cross_entropy(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), label_smoothing=1.0)


def reduced_reference(logits, target, reduction, **kw):
    per_token = reference(logits, target, **kw)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (target != kw.get("ignore_index", IGNORE)).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("upstream", [1.0, 0.37], ids=["grad1", "grad0.37"])
def test_scalar_reductions_compute_the_gradient_in_forward(monkeypatch, dtype, reduction,
                                                           upstream):
    """sum / mean with the gradient written in the forward (several vocab blocks with a
    masked tail); backward leaves it as it is for an upstream gradient of exactly 1 and
    rescales it otherwise. Smoothing, z-loss and ignored tokens included."""
    monkeypatch.setattr(ce_mod, "MAX_BLOCK_V", 256)
    logits, target, _ = make(17, 1023, dtype, seed=8)
    kw = dict(label_smoothing=0.1, z_loss_weight=1e-3)
    base = logits.clone().requires_grad_()
    work = base.clone()
    loss = cross_entropy(work, target, reduction=reduction, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    assert not torch.equal(work, logits), "the forward already wrote the gradient in place"
    (loss * upstream).backward()
    b64 = logits.double().requires_grad_()
    loss64 = reduced_reference(b64, target, reduction, **kw)
    (loss64 * upstream).backward()
    assert_close(loss, loss64, dtype=torch.float32, what="loss")
    if upstream == 1.0 or dtype == torch.float32:
        assert_close(base.grad, b64.grad, what="dlogits")
    else:  # the rescale rounds a second time: two ulps of bf16
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(base.grad.double(), b64.grad, rtol=2 * eps + 1e-5,
                                   atol=1e-6 * b64.grad.abs().max().item())
    assert torch.equal(work, base.grad), "gradient is written in place of the logits"
    # Without a gradient the per-token path is used: same value, logits untouched.
    with torch.no_grad():
        kept = logits.clone()
        assert_close(cross_entropy(kept, target, reduction=reduction, **kw), loss64,
                     dtype=torch.float32, what="loss (no grad)")


def test_scalar_reduction_edge_cases():
    logits, target, _ = make(5, 40, torch.float32, seed=9, ignore_every=0)
    all_ignored = torch.full((5,), IGNORE)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x * 1, all_ignored, reduction="mean")
    assert torch.isnan(loss)                       # as torch: 0 / 0
    loss.backward()
    assert (x.grad == 0).all()
    y = logits.clone().requires_grad_()
    loss = cross_entropy(y * 1, target, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits.clone(), target, reduction="avg")
