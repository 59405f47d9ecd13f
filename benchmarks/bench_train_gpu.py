"""Training throughput on one GPU: megasyne (kernels on / off) vs a plain HF transformers step.

    python benchmarks/bench_train_gpu.py --out bench_train.json          # on a GPU
    python benchmarks/bench_train_gpu.py --dry-run                        # CPU, tiny shapes

TinyLlama-1.1B, sequence 2048, bf16, random tokens, one GPU. For each variant: a few
warm-up steps, then timed optimizer steps (forward + backward + AdamW) ->
tokens/s, TFLOP/s, MFU and peak memory. MFU uses LlamaConfig.flops_per_token
(6N + 12*L*s*h per token) over the card's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).

Variants:
- megasyne/triton: Megatron-Core GPTModel (local spec, SDPA attention), our Triton RMSNorm
  and vocab-parallel cross-entropy, Megatron DDP + optimizer (bf16 params, fp32 master).
- megasyne/torch: the same with MEGASYNE's kernels off (torch RMSNorm, Megatron's CE).
- hf: transformers.LlamaForCausalLM (sdpa), fp32 weights + torch.autocast(bf16) (what
  the HF Trainer does with --bf16), torch.optim.AdamW(fused=True).
The dry run proves the script end to end on CPU (tiny model, fp32); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import megasyne  # noqa: F401  (TRITON_INTERPRET on CPU)
import torch


def timed_steps(step_fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step_fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    return (time.perf_counter() - t0) / steps


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_megasyne(cfg, args, kernels: bool) -> dict:
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.parallel.dims import ParallelDims
    from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
    from megasyne.training.step import train_step

    dims = ParallelDims(world_size=1)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    chunks = build_model(cfg, dims, ModelRuntime(dtype=dtype, triton_kernels=kernels))
    ddp = wrap_ddp(chunks, dims)
    opt = build_optimizer(ddp, dims, OptimConfig(lr=1e-5))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, cfg.vocab_size, (args.mbs, args.seq + 1), generator=g).to(device)
    batch = dict(tokens=seq[:, :-1].contiguous(), labels=seq[:, 1:].contiguous(),
                 loss_mask=torch.ones(args.mbs, args.seq, device=device),
                 position_ids=torch.arange(args.seq, device=device).unsqueeze(0).expand(args.mbs, -1))

    def step():
        train_step(ddp, opt, iter([batch] * args.grad_accum), num_microbatches=args.grad_accum,
                   micro_batch_size=args.mbs, seq_length=args.seq)

    reset_peak()
    dt = timed_steps(step, args.warmup, args.steps)
    out = dict(step_s=dt, peak_mem_gib=peak_mem())
    del ddp, opt, chunks
    gc.collect()
    return out


def bench_hf(cfg, args) -> dict:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(hf_cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95),
                            fused=torch.cuda.is_available())
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, cfg.vocab_size, (args.mbs, args.seq), generator=g).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not args.dry_run)

    def step():
        for _ in range(args.grad_accum):
            with autocast:
                loss = model(input_ids=seq, labels=seq).loss / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    dt = timed_steps(step, args.warmup, args.steps)
    out = dict(step_s=dt, peak_mem_gib=peak_mem())
    del model, opt
    gc.collect()
    return out


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mem():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="megasyne/triton,megasyne/torch,hf")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from megasyne.model.presets import tiny_debug, tinyllama_1_1b
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import init_parallel
    from megasyne.training.metrics import peak_flops_per_device

    if args.dry_run:
        args.seq, args.mbs, args.warmup, args.steps = 32, 2, 1, 2
        cfg = tiny_debug()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --dry-run")
        cfg = tinyllama_1_1b(max_position_embeddings=max(2048, args.seq))
    os.environ.setdefault("MASTER_PORT", "29577")
    init_parallel(ParallelDims(world_size=1))
    tokens_per_step = args.mbs * args.seq * args.grad_accum
    flops_per_token = cfg.flops_per_token(args.seq)
    peak = peak_flops_per_device()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    results = {}
    for variant in args.variants.split(","):
        if variant == "hf":
            r = bench_hf(cfg, args)
        else:
            r = bench_megasyne(cfg, args, kernels=variant == "megasyne/triton")
        r["tokens_per_s"] = tokens_per_step / r["step_s"]
        r["tflops"] = flops_per_token * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
        results[variant] = r
    print(f"\n## Training throughput, {card}, {cfg.name}, seq {args.seq}, micro-batch {args.mbs}\n")
    print("| variant | tokens/s | TFLOP/s | MFU | peak mem GiB | vs hf |")
    print("|---|---|---|---|---|---|")
    base = results.get("hf", {}).get("tokens_per_s")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | {mem} | {ratio} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=card, model=cfg.name, seq=args.seq, mbs=args.mbs,
                           results=results), f, indent=2)


if __name__ == "__main__":
    main()
