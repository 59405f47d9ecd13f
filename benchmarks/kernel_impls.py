"""The implementations bench_kernels.py compares, per kernel: name -> callable.

Ours (megasyne.kernels) and the alternatives a user would otherwise take: torch eager,
torch.compile, Megatron-Core's own functions, Liger-Kernel, Transformer-Engine. Each optional
one is built through ``optional(name, make)``, which records why it is skipped when it does
not import. ``configure`` is called once by bench_kernels.py before anything else here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LLAMA3_8B = dict(hidden=4096, vocab=128256, eps=1e-5)
DEV = torch.device("cpu")
DRY_RUN = False
NO_COMPILE = False
RMS = CE = ROPE = SWIGLU = None
optional = None


def configure(*, dev, dry_run, no_compile, kernels, optional_fn):
    """dev: the device; kernels: our (rmsnorm, cross_entropy, rope, swiglu) modules;
    optional_fn(name, make): make() or None, recording why it failed."""
    global DEV, DRY_RUN, NO_COMPILE, RMS, CE, ROPE, SWIGLU, optional
    DEV, DRY_RUN, NO_COMPILE, optional = dev, dry_run, no_compile, optional_fn
    RMS, CE, ROPE, SWIGLU = kernels


def torch_rmsnorm(x, w, eps=LLAMA3_8B["eps"]):
    x32 = x.float()
    return (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def torch_ce(logits, target):
    return F.cross_entropy(logits.float(), target, reduction="none")


def compile_fn(fn):
    # Dry run: backend "eager" proves the wrapper without running inductor on the shared CPU.
    return torch.compile(fn, backend="eager" if DRY_RUN else "inductor")


def rmsnorm_impls(hidden):
    """name -> (fn(x, w), own weight or None). Module baselines use their own (ones) weight;
    gradients are then taken w.r.t. x and that weight, so every impl computes dx and dw."""
    impls = {"megasyne triton": (lambda x, w: RMS.rmsnorm(x, w, LLAMA3_8B["eps"]), None),
             "torch eager": (torch_rmsnorm, None)}

    def liger():
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        mod = LigerRMSNorm(hidden, eps=LLAMA3_8B["eps"]).to(DEV, torch.bfloat16)
        return (lambda x, w: mod(x)), mod.weight

    def te():
        import transformer_engine.pytorch as te_pt
        mod = te_pt.RMSNorm(hidden, eps=LLAMA3_8B["eps"], params_dtype=torch.bfloat16, device=DEV)
        return (lambda x, w: mod(x)), mod.weight

    for name, make in (("liger RMSNorm", liger), ("transformer-engine RMSNorm", te)):
        entry = optional(name, make)
        if entry is not None:
            impls[name] = entry
    if not NO_COMPILE:  # last: its compile time counts against the budget
        impls["torch.compile"] = (compile_fn(torch_rmsnorm), None)
    return impls


def add_rmsnorm_impls(hidden):
    """name -> (fn(x, r, w) -> (rmsnorm(x + r), x + r), own weight or None): the residual add
    of a transformer layer and the norm that follows it."""
    eps = LLAMA3_8B["eps"]

    def unfused_ours(x, r, w):  # Megatron's layer with our RMSNorm, before the fused layer
        h = x + r
        return RMS.rmsnorm(h, w, eps), h

    def eager(x, r, w):
        h = x + r
        return torch_rmsnorm(h, w), h

    impls = {"megasyne triton": (lambda x, r, w: RMS.add_rmsnorm(x, r, w, eps), None),
             "torch add + megasyne rmsnorm": (unfused_ours, None),
             "torch eager": (eager, None)}

    def liger():
        from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm
        mod = LigerFusedAddRMSNorm(hidden, eps=eps).to(DEV, torch.bfloat16)
        return (lambda x, r, w: mod(x, r)), mod.weight

    entry = optional("liger fused add RMSNorm", liger)
    if entry is not None:
        impls["liger fused add RMSNorm"] = entry
    if not NO_COMPILE:
        impls["torch.compile"] = (compile_fn(eager), None)
    return impls


def init_megatron():
    """World-1 process group + Megatron parallel state for its CE functions."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if DEV.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    return ps


def ce_impls():
    impls = {"megasyne triton": lambda x, t: CE.cross_entropy(x, t),
             # Same semantics as Liger's mean (the model uses per-token losses, above).
             "megasyne triton (mean)": lambda x, t: CE.cross_entropy(x, t, reduction="mean"),
             "torch eager (fp32 upcast)": torch_ce}

    def megatron_unfused():
        init_megatron()
        from megatron.core import tensor_parallel
        return lambda x, t: tensor_parallel.vocab_parallel_cross_entropy(x, t, 0.0)

    def megatron_fused():
        ps = init_megatron()
        if DRY_RUN:  # its jit_fuser is torch.compile: keep the compiler off the shared CPU
            import megatron.core.jit as mjit
            mjit.disable_jit_fuser()
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        group = ps.get_tensor_model_parallel_group()
        return lambda x, t: fused_vocab_parallel_cross_entropy(x, t, group)

    def liger():
        from liger_kernel.transformers.functional import liger_cross_entropy
        return lambda x, t: liger_cross_entropy(x, t)  # reduction mean: its grad-in-forward path

    for name, make in (("megatron-core vocab_parallel_cross_entropy", megatron_unfused),
                       ("megatron-core fused_cross_entropy", megatron_fused),
                       ("liger cross_entropy (mean)", liger)):
        fn = optional(name, make)
        if fn is not None:
            impls[name] = fn
    if not NO_COMPILE:  # last: its compile time counts against the budget
        impls["torch.compile"] = compile_fn(torch_ce)
    return impls


def rope_reference(t, freqs):
    """Megatron-Core's unfused bshd RoPE (rotate-half), written out: t * cos + rot(t) * sin."""
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    t1, t2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


def rope_impls():
    """name -> fn(q, k, freqs) -> (q_rot, k_rot); q/k [s, b, n, d], freqs [s, 1, 1, d] fp32."""
    impls = {"megasyne triton": lambda q, k, f: (ROPE.rope(q, f), ROPE.rope(k, f))}

    def megatron():
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
        return lambda q, k, f: (_apply_rotary_pos_emb_bshd(q, f), _apply_rotary_pos_emb_bshd(k, f))

    def liger():
        from liger_kernel.ops.rope import LigerRopeFunction

        def run(q, k, f):
            # Liger's layout is [b, n, s, d] (HF); with b = 1 the permuted views share memory
            # with ours, so it needs no copy. It rotates q and k in place (values stay finite).
            c = torch.cos(f[:, 0, 0]).to(q.dtype)
            s_ = torch.sin(f[:, 0, 0]).to(q.dtype)
            return LigerRopeFunction.apply(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), c, s_)
        return run

    def te():
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb as te_rope
        return lambda q, k, f: (te_rope(q, f, tensor_format="sbhd", fused=True),
                                te_rope(k, f, tensor_format="sbhd", fused=True))

    for name, make in (("megatron-core unfused RoPE", megatron), ("liger rope", liger),
                       ("transformer-engine fused RoPE", te)):
        fn = optional(name, make)
        if fn is not None:
            impls[name] = fn
    if not NO_COMPILE:
        base = impls.get("megatron-core unfused RoPE")
        ref = base or (lambda q, k, f: (rope_reference(q, f), rope_reference(k, f)))
        impls["torch.compile"] = compile_fn(ref)
    return impls


def torch_glu(x):
    """Megatron-Core's unfused gated activation: chunk, silu(gate) * up."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def swiglu_impls():
    impls = {"megasyne triton": lambda x: SWIGLU.swiglu(x), "torch eager (megatron glu)": torch_glu}

    def megatron():
        if DRY_RUN:  # its jit_fuser is torch.compile: keep the compiler off the shared CPU
            import megatron.core.jit as mjit
            mjit.disable_jit_fuser()
        from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
        return lambda x: bias_swiglu_impl(x, None)

    def liger():
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
        return lambda x: LigerFusedGateUpSiLUMulFunction.apply(x, False)

    for name, make in (("megatron-core bias_swiglu_impl", megatron),
                       ("liger fused gate-up silu-mul", liger)):
        fn = optional(name, make)
        if fn is not None:
            impls[name] = fn
    if not NO_COMPILE:
        impls["torch.compile"] = compile_fn(torch_glu)
    return impls


def rope_angles(s, d, start=0):
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=DEV) / d)
    f = torch.outer(torch.arange(start, start + s, dtype=torch.float64, device=DEV), inv)
    return torch.cat([f, f], -1).float()[:, None, None, :]
