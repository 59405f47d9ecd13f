"""FusedResidualNormLayer vs Megatron's TransformerLayer forward on the same model (1 process).

A tiny_debug model is built with the Triton kernels (interpreter on CPU), so its layers are
FusedResidualNormLayer. Each case runs forward + backward twice on the same weights and
batch: once fused, once with every layer sent to Megatron's own forward (same modules, same
Triton RMSNorm; only the residual add and the norm are separate there). Prints RESULT
{case: diffs, fused-kernel call counts}.
"""

import json
from unittest import mock

import torch

import megasyne  # noqa: F401  (TRITON_INTERPRET=1 without CUDA)
import megasyne.kernels.rmsnorm as rmsnorm_mod
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.layer import FusedResidualNormLayer
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel

dims = ParallelDims(world_size=1)
init_parallel(dims, seed=0)
CASES = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
         "fp32_full_recompute": dict(dtype=torch.float32, recompute="full")}
result = {}
for case, kw in CASES.items():
    cfg = tiny_debug(num_layers=2, hidden_size=96, ffn_hidden_size=200)
    model = build_model(cfg, dims, ModelRuntime(triton_kernels=True, **kw))[0]
    layers = list(model.decoder.layers)
    assert all(type(layer) is FusedResidualNormLayer and layer.fused_reason is None for layer in layers)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights away from 1 so a wrong weight would show
        for layer in layers:
            layer.pre_mlp_layernorm.weight.uniform_(0.5, 1.5, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    reference = None
    if kw["dtype"] != torch.float32:  # the same weights in fp32, Megatron's path: the truth
        ref_model = build_model(cfg, dims, ModelRuntime(triton_kernels=True))[0]
        ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()
                                   if torch.is_tensor(v)}, strict=False)
        for layer in ref_model.decoder.layers:
            layer.fused_reason = "test: Megatron's forward"
        ref_model(tokens, pos, None, labels=tokens).float().mean().backward()
        reference = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    out = {}
    for path in ("fused", "megatron"):
        for layer in layers:
            layer.fused_reason = None if path == "fused" else "test: Megatron's forward"
        model.zero_grad(set_to_none=True)
        calls = []
        real = rmsnorm_mod.add_rmsnorm
        with mock.patch.object(rmsnorm_mod, "add_rmsnorm",
                               side_effect=lambda *a, calls=calls, real=real:
                               calls.append(1) or real(*a)):
            loss = model(tokens, pos, None, labels=tokens).float().mean()
            loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        out[path] = (loss.item(), grads, len(calls))
    f, m = out["fused"], out["megatron"]
    result[case] = dict(
        loss_rel=abs(f[0] - m[0]) / abs(m[0]),
        grad_rel=max(((f[1][n] - m[1][n]).norm() / m[1][n].norm().clamp_min(1e-30)).item()
                     for n in m[1]),
        grads_nonzero=all(m[1][n].abs().sum().item() > 0 for n in m[1]),
        fused_calls=f[2], megatron_calls=m[2], layers=len(layers))
    if reference is not None:
        for path, (_, grads, _) in out.items():
            result[case][f"{path}_err_vs_fp32"] = max(
                ((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in grads)
# What the fused path does not cover sends the layer to Megatron's forward, with the reason.
layer = layers[0]
reasons = {}
for name, attr, value, owner in (("dropout", "hidden_dropout", 0.1, layer),
                                 ("torch norm", "use_kernel", False, layer.pre_mlp_layernorm),
                                 ("norm recompute", "recompute_pre_mlp_layernorm", True, layer)):
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    reasons[name] = layer._why_not_fused()
    setattr(owner, attr, old)
reasons["as built"] = layer._why_not_fused()
result["reasons"] = reasons
print("RESULT " + json.dumps(result))
