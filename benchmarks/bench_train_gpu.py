"""Training throughput on one GPU: megasyne (kernels on / off) vs a plain HF transformers step.

    python benchmarks/bench_train_gpu.py --out bench_train.json          # on a GPU
    python benchmarks/bench_train_gpu.py --dry-run                        # CPU, tiny shapes

TinyLlama-1.1B, sequence 2048, bf16, random tokens, one GPU. For each variant: a few
warm-up steps, then timed optimizer steps (forward + backward + AdamW) ->
tokens/s, TFLOP/s, MFU and peak memory. MFU uses LlamaConfig.flops_per_token
(6N + 12*L*s*h per token) over the card's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
Each step is synchronised and timed on the host; the table gives the median step.

Variants:
- megasyne/triton: Megatron-Core GPTModel (local spec, SDPA attention), our Triton RMSNorm,
  vocab-parallel cross-entropy, RoPE and SwiGLU, Megatron DDP + optimizer (bf16 params, fp32
  master, torch's fused AdamW, weight gradients accumulated in fp32 inside the GEMM when the
  probe of megasyne/megatron_patches/wgrad_slot.py passes; the JSON says whether it did).
- megasyne/torch: the same with megasyne's kernels off (torch RMSNorm, Megatron's CE,
  Megatron's unfused RoPE and gated activation).
--grad-accum N runs N micro-batches per optimizer step (the HF baseline too), as a CPT run
with a large global batch does; the optimizer's fixed cost is then shared by N micro-batches.
- hf: transformers.LlamaForCausalLM (sdpa), fp32 weights + torch.autocast(bf16) (what
  the HF Trainer does with --bf16), torch.optim.AdamW(fused=True).
- hf_bf16 (not in the default list): the same model with bf16 weights and no autocast
  (pure-bf16 AdamW: faster, numerically not the same recipe).

Checks (fail loudly, and the exit status is 1, but every variant still runs):
- every step's loss is finite and no megasyne step was skipped;
- megasyne/triton and megasyne/torch start from the same weights (re-seeded before each
  build) and see the same batch: their first-step losses (before any update) must agree
  within --loss-rtol. On CUDA no CPU shim is active, so this checks the kernels in place.
--profile adds one profiled step per variant: kernel time by category (GEMM, attention, our
kernels, optimizer, copies, other element-wise), the GPU's idle time in the step (host launch
overhead and syncs), and the top kernels (benchmarks/step_profile.py).
A variant that raises is recorded with its error and the others still run; the JSON
(--out) is rewritten after each variant.
The dry run proves the script end to end on CPU (tiny model, fp32); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

import megasyne  # noqa: F401  (TRITON_INTERPRET on CPU)

SEED = 1234


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step_fn, warmup: int, steps: int) -> tuple[list, list]:
    """Run warm-up then timed steps; returns (per-step seconds of timed steps, all losses)."""
    losses, times = [], []
    for _ in range(warmup):
        losses.append(step_fn())
    sync()
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step_fn())
        sync()
        times.append(time.perf_counter() - t0)
    return times, losses


def seed_all(seed: int = SEED):
    torch.manual_seed(seed)
    try:  # Megatron's CUDA RNG tracker (weight init of parallel layers draws from it)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    except Exception:
        pass


def make_tokens(cfg, args, length: int, device):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (args.mbs, length), generator=g).to(device)


def bench_megasyne(cfg, args, kernels: bool) -> dict:
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.parallel.dims import ParallelDims
    from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
    from megasyne.training.step import train_step

    dims = ParallelDims(world_size=1)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    seed_all()
    t_build = time.perf_counter()
    chunks = build_model(cfg, dims, ModelRuntime(dtype=dtype, triton_kernels=kernels))
    ddp = wrap_ddp(chunks, dims)
    opt = build_optimizer(ddp, dims, OptimConfig(lr=1e-5))
    build_s = time.perf_counter() - t_build
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq = make_tokens(cfg, args, args.seq + 1, device)
    batch = dict(tokens=seq[:, :-1].contiguous(), labels=seq[:, 1:].contiguous(),
                 loss_mask=torch.ones(args.mbs, args.seq, device=device),
                 position_ids=torch.arange(args.seq, device=device).unsqueeze(0).expand(args.mbs, -1))
    skipped = []

    def step():
        r = train_step(ddp, opt, iter([batch] * args.grad_accum), num_microbatches=args.grad_accum,
                       micro_batch_size=args.mbs, seq_length=args.seq)
        skipped.append(r.skipped)
        return r.loss

    reset_peak()
    times, losses = timed_steps(step, args.warmup, args.steps)
    from megasyne.megatron_patches import wgrad_accumulation_status

    out = dict(step_times_s=times, losses=losses, skipped_steps=sum(skipped),
               peak_mem_gib=peak_mem(), build_s=build_s,
               wgrad_fusion=bool(chunks[0].config.gradient_accumulation_fusion),
               wgrad_fusion_off_because=wgrad_accumulation_status(),
               rope_fusion=bool(chunks[0].config.apply_rope_fusion))
    maybe_profile(args, out, step)
    ddp = opt = chunks = batch = step = None  # drop the model's GPU memory before free()
    free()
    return out


def bench_hf(cfg, args, bf16_weights: bool = False) -> dict:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed_all()
    t_build = time.perf_counter()
    with torch.device(device):  # initialise on the GPU (CPU init of 1.1B params is slow)
        model = transformers.LlamaForCausalLM(hf_cfg)
    if bf16_weights:
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=torch.cuda.is_available())
    build_s = time.perf_counter() - t_build
    seq = make_tokens(cfg, args, args.seq, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16,
                              enabled=not args.dry_run and not bf16_weights)

    def step():
        total = 0.0
        for _ in range(args.grad_accum):
            with autocast:
                loss = model(input_ids=seq, labels=seq).loss / args.grad_accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    reset_peak()
    times, losses = timed_steps(step, args.warmup, args.steps)
    losses = [float(x) for x in losses]  # one sync per step, after the timing
    out = dict(step_times_s=times, losses=losses, skipped_steps=0, peak_mem_gib=peak_mem(),
               build_s=build_s)
    maybe_profile(args, out, step)
    model = opt = step = None  # drop the model's GPU memory before free()
    free()
    return out


def maybe_profile(args, out: dict, step_fn) -> None:
    """With --profile: one more step under the profiler -> out["profile"] (step_profile.py)."""
    if not args.profile:
        return
    from step_profile import profile_step

    try:
        out["profile"] = profile_step(step_fn)
    except Exception as exc:  # a profiler problem must not lose the timings
        out["profile_error"] = f"{type(exc).__name__}: {exc}"
        print(f"!! profile failed: {out['profile_error']}", flush=True)


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_mem():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def versions() -> dict:
    out = dict(torch=torch.__version__, python=sys.version.split()[0])
    for mod in ("triton", "transformers", "megatron.core"):
        try:
            out[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as exc:
            out[mod] = f"n/a ({type(exc).__name__})"
    out["cuda"] = torch.version.cuda
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="megasyne/triton,megasyne/torch,hf",
                    help="comma list of megasyne/triton, megasyne/torch, hf, hf_bf16")
    ap.add_argument("--loss-rtol", type=float, default=2e-3,
                    help="first-step loss agreement, kernels on vs off (relative)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step of every variant: kernel time by category, "
                         "GPU idle time, top kernels (benchmarks/step_profile.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from megasyne.model import accel
    from megasyne.model.presets import tiny_debug, tinyllama_1_1b
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import init_parallel
    from megasyne.training.metrics import peak_flops_per_device

    if args.dry_run:
        args.seq, args.mbs, args.warmup, args.steps = 32, 2, 1, 2
        args.grad_accum = min(args.grad_accum, 2)  # the interpreter takes seconds per micro-batch
        cfg = tiny_debug()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --dry-run")
        cfg = tinyllama_1_1b()  # the preset already sets max_position_embeddings=2048
        if args.seq > cfg.max_position_embeddings:
            cfg = dataclasses.replace(cfg, max_position_embeddings=args.seq)
    os.environ.setdefault("MASTER_PORT", "29577")
    init_parallel(ParallelDims(world_size=1))
    tokens_per_step = args.mbs * args.seq * args.grad_accum
    flops_per_token = cfg.flops_per_token(args.seq)
    peak = peak_flops_per_device()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    print(f"# {card}; {versions()}; path: {accel.describe()}", flush=True)
    print(f"# {cfg.name}: {cfg.num_parameters() / 1e9:.3f}B params, "
          f"{flops_per_token / 1e9:.2f} GFLOP/token at seq {args.seq}; "
          f"{tokens_per_step} tokens/step; peak {peak}", flush=True)
    report = dict(card=card, model=cfg.name, seq=args.seq, mbs=args.mbs,
                  grad_accum=args.grad_accum, warmup=args.warmup, steps=args.steps,
                  tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
                  peak_flops=peak, versions=versions(), path=accel.describe(),
                  dry_run=args.dry_run, results={}, checks={}, errors={})
    failed = False

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    results = report["results"]
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        t0 = time.perf_counter()
        try:
            if variant == "hf":
                r = bench_hf(cfg, args)
            elif variant == "hf_bf16":
                r = bench_hf(cfg, args, bf16_weights=True)
            elif variant in ("megasyne/triton", "megasyne/torch"):
                r = bench_megasyne(cfg, args, kernels=variant == "megasyne/triton")
            else:
                raise ValueError(f"unknown variant {variant!r}")
        except Exception as exc:
            failed = True
            report["errors"][variant] = f"{type(exc).__name__}: {exc}"
            print(f"!! variant {variant} FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            free()
            save()
            continue
        r["step_s"] = statistics.median(r["step_times_s"])
        r["tokens_per_s"] = tokens_per_step / r["step_s"]
        r["tflops"] = flops_per_token * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
        r["wall_s"] = time.perf_counter() - t0
        finite = all(math.isfinite(x) for x in r["losses"])
        ok = finite and r["skipped_steps"] == 0
        report["checks"][f"{variant}: losses finite, no skipped step"] = ok
        failed |= not ok
        results[variant] = r
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        print(f"{variant}: median step {1e3 * r['step_s']:.1f} ms "
              f"(min {1e3 * min(r['step_times_s']):.1f}, max {1e3 * max(r['step_times_s']):.1f}), "
              f"{r['tokens_per_s']:.0f} tokens/s, build {r['build_s']:.1f} s, wall {r['wall_s']:.1f} s; "
              f"losses [{losses}]; {'ok' if ok else 'NON-FINITE LOSS OR SKIPPED STEP'}"
              + (f"; wgrad fusion {r['wgrad_fusion']} ({r['wgrad_fusion_off_because'] or 'ok'}),"
                 f" rope fusion {r['rope_fusion']}" if "wgrad_fusion" in r else ""), flush=True)
        if "profile" in r:
            from step_profile import format_report

            print(format_report(r["profile"]), flush=True)
        save()

    on, off = results.get("megasyne/triton"), results.get("megasyne/torch")
    if on and off:
        a, b = on["losses"][0], off["losses"][0]
        rel = abs(a - b) / max(abs(b), 1e-12)
        ok = rel <= args.loss_rtol
        report["checks"]["first-step loss, kernels on vs off"] = ok
        report["first_loss_on_off"] = dict(on=a, off=b, rel_diff=rel, rtol=args.loss_rtol)
        failed |= not ok
        print(f"first-step loss: kernels on {a:.6f}, off {b:.6f}, rel diff {rel:.2e} "
              f"(rtol {args.loss_rtol:g}): {'ok' if ok else 'MISMATCH'}", flush=True)

    print(f"\n## Training throughput, {card}, {cfg.name}, seq {args.seq}, micro-batch {args.mbs}"
          f"{f' x {args.grad_accum}' if args.grad_accum > 1 else ''}, "
          f"{args.warmup} warm-up + {args.steps} timed steps (median)\n")
    print("| variant | step ms | tokens/s | TFLOP/s | MFU | peak mem GiB | vs hf |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("hf", {}).get("tokens_per_s")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        print(f"| {name} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} "
              f"| {mfu} | {mem} | {ratio} |")
    for name, err in report["errors"].items():
        print(f"| {name} | FAILED: {err[:120]} |")
    if on and on.get("mfu") is not None:
        report["targets"] = dict(
            mfu_ge_50pct=on["mfu"] >= 0.5,
            speedup_vs_hf_ge_1_5x=(on["tokens_per_s"] / base >= 1.5) if base else None)
        print(f"\ntargets (megasyne/triton): MFU >= 50%: {report['targets']['mfu_ge_50pct']}; "
              f">= 1.5x hf tokens/s: {report['targets']['speedup_vs_hf_ge_1_5x']}")
    print("checks: " + "; ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in report["checks"].items()))
    save()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
