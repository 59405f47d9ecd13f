"""TP2 worker (torchrun, gloo, CPU): our vocab-parallel cross-entropy vs Megatron-Core's and
vs our single-rank kernel. Each rank saves its tensors to ``<out_dir>/rank<r>.pt``; the test
(test_vocab_parallel.py) does the comparisons with the shared tolerance table.

    torchrun --nproc_per_node=2 tests/kernels/vocab_parallel_worker.py OUT_DIR
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / megatron are imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from megasyne.kernels.cross_entropy import cross_entropy, vocab_parallel_cross_entropy  # noqa: E402

SEQ, BATCH, VOCAB = 5, 3, 1002  # shard of 501 columns: odd
IGNORE = -100


def inputs(dtype, seed, ignore):
    g = torch.Generator().manual_seed(seed)  # same on every rank
    logits = (3 * torch.randn(SEQ, BATCH, VOCAB, generator=g) + 0.5).to(dtype)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    if ignore:
        target[1, :] = IGNORE
        target[3, 2] = IGNORE
    grad = torch.rand(SEQ, BATCH, generator=g) + 0.5
    return logits, target, grad


def loss_and_grad(fn, logits, target, grad):
    """Loss and d(loss . grad)/dlogits of ``fn(work_copy, target)``."""
    base = logits.clone().requires_grad_()
    loss = fn(base.clone(), target)
    loss.backward(grad)
    return loss.detach(), base.grad


def main(out_dir):
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp = ps.get_tensor_model_parallel_group()
    rank = ps.get_tensor_model_parallel_rank()
    shard = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    out = {"rank": rank, "shard": (shard.start, shard.stop)}

    for name, dtype, seed, kw, ignore in (
        ("fp32", torch.float32, 0, {}, False),
        ("bf16", torch.bfloat16, 1, {}, False),
        ("fp32_smooth_z_ignore", torch.float32, 2,
         dict(label_smoothing=0.1, z_loss_weight=1e-3), True),
    ):
        logits, target, grad = inputs(dtype, seed, ignore)
        local = logits[..., shard].contiguous()
        ours_tp = loss_and_grad(
            lambda x, t, kw=kw: vocab_parallel_cross_entropy(x, t, tp_group=tp, **kw), local,
            target, grad)
        ours_single = loss_and_grad(lambda x, t, kw=kw: cross_entropy(x, t, **kw), logits,
                                    target, grad)
        rec = dict(logits=logits, target=target, grad=grad, kw=kw,
                   ours_tp=ours_tp, ours_single=ours_single)
        if not kw:  # Megatron has no ignore_index / z-loss; its TP>1 smoothing is rank-local
            rec["megatron_tp"] = loss_and_grad(
                lambda x, t: tensor_parallel.vocab_parallel_cross_entropy(x, t, 0.0),
                local, target, grad)
        out[name] = rec

    # Megatron's label smoothing at TP1 (where it is well defined) vs our plain kernel.
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    logits, target, grad = inputs(torch.float32, 3, False)
    out["tp1_smoothing"] = dict(
        logits=logits, target=target, grad=grad,
        megatron=loss_and_grad(
            lambda x, t: tensor_parallel.vocab_parallel_cross_entropy(x, t, 0.1),
            logits, target, grad),
        ours=loss_and_grad(lambda x, t: cross_entropy(x, t, label_smoothing=0.1),
                           logits, target, grad),
    )
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
