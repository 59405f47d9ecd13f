"""SDPA core attention vs Megatron's DotProductAttention on the same weights (1 process)."""

import json

import torch

import megasyne  # noqa: F401
from megasyne.checkpoint.sharding import gather_full_state, load_full_state
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import tiny_debug, tiny_debug_mha
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel

dims = ParallelDims(world_size=1)
init_parallel(dims, seed=0)
result = {}
for cfg in (tiny_debug(), tiny_debug_mha()):
    ref = build_model(cfg, dims, ModelRuntime(attention="megatron"))[0]
    sdpa = build_model(cfg, dims, ModelRuntime(attention="sdpa", init_weights=False))[0]
    load_full_state(sdpa, gather_full_state(ref), 0, 1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    out = {}
    for name, model in (("megatron", ref), ("sdpa", sdpa)):
        loss = model(tokens, pos, None, labels=tokens).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        logits = model(tokens, pos, None).detach()
        out[name] = (loss.item(), logits, grads)
    result[cfg.name] = dict(
        loss_diff=abs(out["megatron"][0] - out["sdpa"][0]),
        logit_diff=(out["megatron"][1] - out["sdpa"][1]).abs().max().item(),
        grad_diff=max((out["megatron"][2][n] - out["sdpa"][2][n]).abs().max().item()
                      for n in out["megatron"][2]),
        core=type(sdpa.decoder.layers[0].self_attention.core_attention).__name__,
    )
print("RESULT " + json.dumps(result))
