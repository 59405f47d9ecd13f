"""Trains tiny_debug 3 steps with torch ops and again with our Triton kernels (interpreter).

Usage: model_kernels_worker.py OUT_DIR LAYOUT (LAYOUT: "single" on 1 rank, "tp2_sp" on 2).
With kernels, RMSNorm, the fused residual-add + RMSNorm layer, cross-entropy, RoPE
(Megatron's fused-RoPE slot) and SwiGLU (the MLP's activation module) are ours. A third run
uses torch's ops with megasyne's weight-gradient accumulation fusion forced on (its fp32 CPU
reference: the wiring into Megatron's linear layers and DDP is what runs here; the GPU GEMM
is probed where it is used). All start from the same full weights (built once, loaded into
each) and see the same batches; the per-step losses and grad norms go to
OUT_DIR/<LAYOUT>.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA)
from megasyne.checkpoint.sharding import gather_full_state, load_full_state
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
from megasyne.training.step import train_step
from tests.parallel.parity_worker import SEQ, global_batches, micro_batches

LAYOUTS = {"single": dict(), "tp2_sp": dict(tp=2, sequence_parallel=True)}


def main(out_dir: str, layout: str) -> None:
    from megatron.core import parallel_state as ps

    dims = ParallelDims(world_size=int(os.environ.get("WORLD_SIZE", 1)), **LAYOUTS[layout])
    init_parallel(dims, seed=0)
    cfg = tiny_debug()
    full = gather_full_state(build_model(cfg, dims, ModelRuntime(triton_kernels=False))[0],
                             ps.get_tensor_model_parallel_group())
    results = {}
    variants = {"torch": (False, False), "kernels": (True, False), "wgrad": (False, True)}
    for name, (kernels, wgrad) in variants.items():
        chunks = build_model(cfg, dims, ModelRuntime(triton_kernels=kernels, wgrad_fusion=wgrad))
        assert chunks[0].config.gradient_accumulation_fusion is wgrad
        from megasyne.model.norm import RMSNorm

        norms_ = [m for m in chunks[0].modules() if isinstance(m, RMSNorm)]
        assert len(norms_) == 2 * cfg.num_layers + 1  # every norm, the final one included
        assert all(m.use_kernel is kernels for m in norms_)
        assert chunks[0].use_triton_cross_entropy is kernels
        from megatron.core.models.common.embeddings import rope_utils

        from megasyne.model.fusions import SwiGLU, fused_rope

        swiglus = [m for m in chunks[0].modules() if isinstance(m, SwiGLU)]
        assert len(swiglus) == (cfg.num_layers if kernels else 0)
        assert chunks[0].config.apply_rope_fusion is kernels
        # With the kernels the attention residual add and the pre-MLP norm are one kernel.
        from megasyne.model.layer import FusedResidualNormLayer

        layers = list(chunks[0].decoder.layers)
        assert all(isinstance(layer, FusedResidualNormLayer) is kernels for layer in layers)
        assert not kernels or all(layer.fused_reason is None for layer in layers)
        assert not kernels or rope_utils.fused_apply_rotary_pos_emb is fused_rope
        # Checkpoints do not depend on the switch: the same sharded keys (Megatron's MLP
        # asks the activation module for its sharded state too).
        keys = sorted(chunks[0].sharded_state_dict().keys())
        results.setdefault("sharded_keys", {})[name] = keys
        load_full_state(chunks[0], full, ps.get_tensor_model_parallel_rank(), dims.tp)
        ddp = wrap_ddp(chunks, dims)
        optimizer = build_optimizer(ddp, dims, OptimConfig(lr=1e-3, weight_decay=0.1))
        losses, norms = [], []
        for tokens in global_batches():
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
            mbs = micro_batches(tokens, 0, 1, 2)
            r = train_step(ddp, optimizer, iter(mbs), num_microbatches=len(mbs),
                           micro_batch_size=2, seq_length=SEQ)
            losses.append(r.loss)
            norms.append(r.grad_norm)
        results[name] = dict(losses=losses, grad_norms=norms)
        # With the fusion every linear weight's gradient went into main_grad inside the GEMM
        # (Megatron marks it so; DDP then skips its own add); without it, none did.
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        linears = [m.weight for m in chunks[0].modules()
                   if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        assert linears and all(getattr(w, "grad_added_to_main_grad", False) is wgrad
                               for w in linears), name
    keys = results.pop("sharded_keys")
    assert keys["kernels"] == keys["torch"] and len(keys["torch"]) > 0, \
        "checkpoint keys depend on kernels"
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out_dir, f"{layout}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
