"""Our Triton kernels (RMSNorm, vocab-parallel cross-entropy, RoPE, SwiGLU) vs the alternatives,
at Llama-3-8B shapes.

    python benchmarks/bench_kernels.py --out bench_kernels.json   # one H100/H200, < 4 min
    python benchmarks/bench_kernels.py --dry-run                   # CPU, interpreter, tiny shapes

1. Correctness on the device first: our kernels vs a float64 torch reference (1 ulp of the
   output dtype, see tests/kernels/tolerances.py), bf16/fp32, odd sizes, smoothing + z-loss.
2. Device-to-device copy bandwidth (torch copy_ of 1 GiB: read + write bytes / time).
3. For each shape and implementation, bf16: forward, backward, fwd+bwd times (median of CUDA
   event timings), the extra peak memory of one fwd+bwd over its inputs, and the achieved
   bandwidth of fwd+bwd under the *minimum* traffic model (RMSNorm: read x, write y; read
   dy, x, write dx = 5 x T x H x 2 bytes; cross-entropy: read the logits in forward, read and
   write them in backward = 3 x N x V x 2 bytes; RoPE on q and k: read + write each forward
   and backward; SwiGLU on [T, 2F]: forward reads 2F writes F, backward reads F + 2F writes
   2F per token) as a fraction of the copy bandwidth, for fwd, bwd and fwd+bwd separately.

Shapes: RMSNorm T in {8192, 16384} tokens x hidden 4096. RoPE: q [T, 1, 32, 128] and
k [T, 1, 8, 128] of one layer (both per call). SwiGLU: [T, 2 x 14336]. Cross-entropy N in {8192, 16384}
tokens x vocab 128256 whole and split 2/4/8 ways. A split is SIMULATED on one GPU: the kernel
runs on a [N, V/k] shard with world-size-1 math for the local phases (targets drawn inside the
shard); the three [N]-sized all-reduces of real tensor parallelism are not timed.

Implementations (each skipped with a printed reason when it does not import):
  RMSNorm:  megasyne triton | torch eager (megasyne's fallback formula) | torch.compile of it |
            Liger-Kernel LigerRMSNorm | Transformer-Engine RMSNorm
  CE:       megasyne triton (per token, the model's path) | megasyne triton (mean: gradient
            computed in the forward, the semantics Liger is timed with) | torch eager
            F.cross_entropy on fp32-upcast logits (what HF does) | torch.compile of it |
            megatron-core tensor_parallel.vocab_parallel_cross_entropy |
            megatron-core fusions.fused_cross_entropy | Liger-Kernel cross entropy (mean)
  RoPE:     megasyne triton | megatron-core unfused bshd RoPE (its path without TE) |
            torch.compile of it | Liger-Kernel rope (its [b, n, s, d] layout) | TE fused RoPE
  SwiGLU:   megasyne triton | torch eager (megatron-core's unfused glu) | torch.compile of it
            | megatron-core bias_swiglu_impl | Liger-Kernel fused gate-up SiLU-mul
A global time budget (--budget-s) skips what is left once exceeded, so the run stays short.

The dry run exercises every code path on CPU with tiny shapes (Triton interpreter;
torch.compile with backend="eager" and Megatron's fused CE with its jit fuser off, so no
compiler runs on the shared CPU); its timings mean nothing. On a GPU box without megatron-core
or Liger, `pip install --no-deps --target DIR` their wheels and put DIR on PYTHONPATH.
`--sweep` also times our kernels' knobs (RMSNorm launch candidates, CE block); the RMSNorm
launch tuner's own choice per shape is reported in any case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tokens", default="8192,16384")
    ap.add_argument("--splits", default="1,2,4,8", help="vocab split ways (simulated TP)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop timing after this")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--sweep", action="store_true",
                    help="also time our kernels' tuning knobs at the largest shape")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.dry_run:  # read when @triton.jit decorates: before triton / megatron are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() and not ARGS.dry_run else "cpu")
T0 = time.perf_counter()


def load_kernels():
    """megasyne.kernels when installed, else the files in kernels/ (they import only torch
    and triton), so the script also runs from a bare checkout on a GPU box."""
    names = ("rmsnorm", "cross_entropy", "rope", "swiglu")
    try:
        from megasyne.kernels import cross_entropy, rmsnorm, rope, swiglu
        return rmsnorm, cross_entropy, rope, swiglu
    except ImportError:
        mods = []
        for name in names:
            spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "kernels" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods.append(mod)
        return tuple(mods)


RMS, CE, ROPE, SWIGLU = load_kernels()
SKIPPED: dict[str, str] = {}


def optional(name, fn):
    """Run an import/constructor; on failure record and print why the baseline is skipped."""
    try:
        return fn()
    except Exception as exc:  # ImportError, RuntimeError (TE without cudnn), version drift
        SKIPPED[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        print(f"skip {name}: {SKIPPED[name]}")
        return None


import kernel_impls as impls  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)
from kernel_impls import LLAMA3_8B, rope_angles, rope_reference, torch_glu  # noqa: E402

impls.configure(dev=DEV, dry_run=ARGS.dry_run, no_compile=ARGS.no_compile,
                kernels=(RMS, CE, ROPE, SWIGLU), optional_fn=optional)


# --- Timing ---


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


_BUSY: list = []


def keep_gpu_busy():
    """Queue ~0.25 ms of GPU work (zeroing 1 GiB) before the start event: the GPU is then
    still busy while Python enqueues the timed call, so the events measure GPU time, not
    launch latency (as triton's do_bench does). It also evicts L2."""
    if not _BUSY:
        _BUSY.append(torch.empty(1 << 30, dtype=torch.uint8, device=DEV))
    _BUSY[0].zero_()


def time_ms(fn, setup=None, reps=None, warmup=None) -> float:
    """Median ms of ``fn(setup())``; ``setup`` runs untimed before each call."""
    reps, warmup = reps or ARGS.reps, ARGS.warmup if warmup is None else warmup
    for _ in range(warmup):
        fn(setup() if setup else None)
    sync()
    times = []
    for _ in range(reps):
        state = setup() if setup else None
        if DEV.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            keep_gpu_busy()
            start.record()
            fn(state)
            end.record()
            times.append((start, end))
        else:
            t = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - t) * 1e3)
    sync()
    if DEV.type == "cuda":
        times = [s.elapsed_time(e) for s, e in times]
    return statistics.median(times)


def peak_extra_gib(fn) -> float | None:
    """Peak memory of one call over what was allocated before it (GiB); CUDA only."""
    if DEV.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(None)  # kept alive until measured
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    del out
    return peak


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy: (read + write) bytes / time, GB/s."""
    n = (1 << 30) if DEV.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda _: dst.copy_(src), reps=10, warmup=3)
    return 2 * n / (ms * 1e-3) / 1e9


# --- Correctness on the device ---


def within_ulp(actual, expected, dtype) -> tuple[bool, float]:
    """|a - e| <= 1e-6 max|e| + (eps(dtype) + 1e-5) |e|: one ulp of the output dtype."""
    a, e = actual.detach().double(), expected.detach().double()
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    bound = 1e-6 * e.abs().max() + (eps + 1e-5) * e.abs()
    err = (a - e).abs()
    return bool((err <= bound).all()), float((err / (e.abs() + 1e-30)).max())


def rmsnorm64(x64, w64, eps=1e-5):
    """The float64 RMSNorm reference of the correctness checks."""
    return w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def check_correctness() -> list[dict]:
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = 256 if ARGS.dry_run else LLAMA3_8B["hidden"]
    for rows, h, dtype in ((257, hidden, torch.bfloat16), (33, 1000, torch.float32), (3, 7, torch.float16)):
        x = (2 * torch.randn(rows, h, generator=g) + 0.3).to(DEV, dtype)
        w = (1 + 0.2 * torch.randn(h, generator=g)).to(DEV, dtype)
        dy = torch.randn(rows, h, generator=g).to(DEV, dtype)
        xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = RMS.rmsnorm(xk, wk, 1e-5)
        dx, dw = torch.autograd.grad(y, [xk, wk], dy)
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        y64 = rmsnorm64(x64, w64)
        dx64, dw64 = torch.autograd.grad(y64, [x64, w64], dy.double())
        for what, a, e in (("y", y, y64), ("dx", dx, dx64), ("dweight", dw, dw64)):
            ok, rel = within_ulp(a, e, dtype)
            out.append(dict(kernel="rmsnorm", shape=[rows, h], dtype=str(dtype), what=what, ok=ok, max_rel=rel))
    # Fused residual add + RMSNorm (the model's layers use it): h = x + r rounded to the dtype
    # (within 1 ulp of the exact sum), then y, dx = dres + the norm's input gradient, dweight
    # within 1 ulp of float64 on that h. (Not against torch's bf16 add: the Triton interpreter
    # rounds fp32 -> bf16 toward zero where a GPU rounds to nearest, so h may differ by 1 ulp.)
    for rows, h, dtype in ((257, hidden, torch.bfloat16), (33, 1000, torch.float32)):
        x, r = ((2 * torch.randn(rows, h, generator=g)).to(DEV, dtype) for _ in range(2))
        w = (1 + 0.2 * torch.randn(h, generator=g)).to(DEV, dtype)
        dy, dres = (torch.randn(rows, h, generator=g).to(DEV, dtype) for _ in range(2))
        xk, rk, wk = (t.clone().requires_grad_() for t in (x, r, w))
        y, hsum = RMS.add_rmsnorm(xk, rk, wk, 1e-5)
        dx, dr, dw = torch.autograd.grad((y, hsum), [xk, rk, wk], (dy, dres))
        h64 = hsum.detach().double().requires_grad_()
        w64 = w.double().requires_grad_()
        y64 = rmsnorm64(h64, w64)
        dh64, dw64 = torch.autograd.grad(y64, [h64, w64], dy.double())
        dx64 = dh64 + dres.double()
        for what, a, e in (("y", y, y64), ("h", hsum, x.double() + r.double()), ("dx", dx, dx64),
                           ("dresidual", dr, dx64), ("dweight", dw, dw64)):
            ok, rel = within_ulp(a, e, dtype)
            out.append(dict(kernel="add_rmsnorm", shape=[rows, h], dtype=str(dtype), what=what,
                            ok=ok, max_rel=rel))
    vocab = 1000 if ARGS.dry_run else LLAMA3_8B["vocab"]
    for n, v, dtype, ls, z in ((64, vocab // 8, torch.bfloat16, 0.1, 1e-4), (33, 1023, torch.float32, 0.0, 0.0),
                               (4, vocab, torch.bfloat16, 0.0, 1e-4)):
        logits = (3 * torch.randn(n, v, generator=g)).to(DEV, dtype)
        target = torch.randint(0, v, (n,), generator=g).to(DEV)
        target[1::5] = -100
        gr = (torch.rand(n, generator=g) + 0.5).to(DEV)
        base = logits.clone().requires_grad_()
        loss = CE.cross_entropy(base.clone(), target, label_smoothing=ls, z_loss_weight=z)
        (dl,) = torch.autograd.grad(loss, [base], gr)
        x64 = logits.double().requires_grad_()
        s = ls * v / (v - 1)
        lse = torch.logsumexp(x64, -1)
        xt = x64.gather(-1, target.clamp(min=0)[:, None])[:, 0]
        l64 = ((1 - s) * (lse - xt) + s * (lse - x64.mean(-1)) + z * lse**2) * (target != -100)
        (dl64,) = torch.autograd.grad(l64, [x64], gr.double())
        for what, a, e, dt in (("loss", loss, l64, torch.float32), ("dlogits", dl, dl64, dtype)):
            ok, rel = within_ulp(a, e, dt)
            out.append(dict(kernel="cross_entropy", shape=[n, v], dtype=str(dtype), what=what, ok=ok, max_rel=rel))
    for n, v, dtype in ((64, vocab // 8, torch.bfloat16), (33, 1023, torch.float32)):
        logits = (3 * torch.randn(n, v, generator=g)).to(DEV, dtype)
        target = torch.randint(0, v, (n,), generator=g).to(DEV)
        target[1::5] = -100
        base = logits.clone().requires_grad_()
        loss = CE.cross_entropy(base.clone(), target, reduction="mean")  # grad in forward
        (dl,) = torch.autograd.grad(loss, [base])
        x64 = logits.double().requires_grad_()
        l64 = F.cross_entropy(x64, target, ignore_index=-100)
        (dl64,) = torch.autograd.grad(l64, [x64])
        for what, a, e, dt in (("mean loss", loss, l64, torch.float32), ("dlogits (mean)", dl, dl64, dtype)):
            ok, rel = within_ulp(a, e, dt)
            out.append(dict(kernel="cross_entropy", shape=[n, v], dtype=str(dtype), what=what, ok=ok, max_rel=rel))
    heads, head_dim = (4, 16) if ARGS.dry_run else (32, 128)
    # Llama-3-8B queries (one row per program), TinyLlama-like keys (4 heads x 64: 16 rows per
    # program), and 3 odd heads in fp32 (8 rows per program, the last one partly masked).
    for s_, b, n, d, dtype in ((65, 2, heads, head_dim, torch.bfloat16),
                               (65, 2, 4, 64, torch.bfloat16), (33, 1, 3, head_dim, torch.float32)):
        t = torch.randn(s_, b, n, d, generator=g).to(DEV, dtype)
        f = rope_angles(s_, d, start=4000)
        dy = torch.randn(s_, b, n, d, generator=g).to(DEV, dtype)
        tk = t.clone().requires_grad_()
        y = ROPE.rope(tk, f)
        (dt,) = torch.autograd.grad(y, [tk], dy)
        t64 = t.double().requires_grad_()
        y64 = rope_reference(t64, f.double())
        (dt64,) = torch.autograd.grad(y64, [t64], dy.double())
        for what, a, e in (("y", y, y64), ("dt", dt, dt64)):
            ok, rel = within_ulp(a, e, dtype)
            out.append(dict(kernel="rope", shape=[s_, b, n, d], dtype=str(dtype), what=what, ok=ok, max_rel=rel))
    ffn = 100 if ARGS.dry_run else 14336
    for rows, f_, dtype in ((129, ffn, torch.bfloat16), (7, 1001, torch.float32)):
        x = (3 * torch.randn(rows, 2 * f_, generator=g)).to(DEV, dtype)
        dy = torch.randn(rows, f_, generator=g).to(DEV, dtype)
        xk = x.clone().requires_grad_()
        y = SWIGLU.swiglu(xk)
        (dx,) = torch.autograd.grad(y, [xk], dy)
        x64 = x.double().requires_grad_()
        y64 = torch_glu(x64)
        (dx64,) = torch.autograd.grad(y64, [x64], dy.double())
        for what, a, e in (("y", y, y64), ("dx", dx, dx64)):
            ok, rel = within_ulp(a, e, dtype)
            out.append(dict(kernel="swiglu", shape=[rows, 2 * f_], dtype=str(dtype), what=what, ok=ok, max_rel=rel))
    return out


# --- Cases ---


def _outs(out):
    return out if isinstance(out, tuple) else (out,)


def _ones(outs):
    return [torch.ones_like(o) if o.dim() else None for o in outs]


def measure(kind, shape, name, fwd, make_inputs, grad_of, ideal_bytes):
    """fwd / bwd / fwd+bwd ms and peak memory of ``fwd(*inputs)`` (a tensor or a tuple of
    them); grads w.r.t. grad_of(inputs). ``ideal_bytes`` = (forward, backward) minimum traffic."""
    row = dict(kernel=kind, shape=list(shape), impl=name)
    if time.perf_counter() - T0 > ARGS.budget_s:
        row["skipped"] = "time budget"
        return row
    try:
        inputs = make_inputs()
        wrt = grad_of(inputs)

        def bwd_setup():
            outs = _outs(fwd(*inputs))
            return outs, _ones(outs)

        def step_bwd(state):
            outs, g = state
            return torch.autograd.grad(outs, wrt, g, allow_unused=True)

        def step_both(_):
            outs = _outs(fwd(*inputs))
            return torch.autograd.grad(outs, wrt, _ones(outs), allow_unused=True)

        t_first = time.perf_counter()
        step_both(None)  # first call: compiles (torch.compile / Triton JIT, our tuner), excluded
        sync()
        row["first_call_s"] = round(time.perf_counter() - t_first, 2)
        row["fwd_ms"] = time_ms(lambda _: fwd(*inputs))
        row["bwd_ms"] = time_ms(step_bwd, setup=bwd_setup)
        row["fwd_bwd_ms"] = time_ms(step_both)
        row["peak_extra_gib"] = peak_extra_gib(step_both)
        fwd_b, bwd_b = ideal_bytes
        row["gbs"] = (fwd_b + bwd_b) / (row["fwd_bwd_ms"] * 1e-3) / 1e9
        row["fwd_gbs"] = fwd_b / (row["fwd_ms"] * 1e-3) / 1e9
        row["bwd_gbs"] = bwd_b / (row["bwd_ms"] * 1e-3) / 1e9
    except Exception as exc:  # e.g. out of memory, an API drift in an optional baseline
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        print(f"  {kind} {shape} {name}: {row['error']}")
    finally:
        inputs = wrt = None  # noqa: F841
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_cases(tokens, splits) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    hidden = 256 if ARGS.dry_run else LLAMA3_8B["hidden"]
    vocab = 1000 if ARGS.dry_run else LLAMA3_8B["vocab"]
    rms, ce = impls.rmsnorm_impls(hidden), impls.ce_impls()
    for t in tokens:
        def make_x(t=t):
            g = torch.Generator(device=DEV).manual_seed(0)
            x = torch.randn(t, hidden, device=DEV, dtype=dtype, generator=g).requires_grad_()
            w = (1 + 0.1 * torch.randn(hidden, device=DEV, generator=g)).to(dtype).requires_grad_()
            return x, w
        ideal = (2 * t * hidden * dtype.itemsize, 3 * t * hidden * dtype.itemsize)
        for name, (fn, own_w) in rms.items():
            grad_of = (lambda i: [i[0], i[1]]) if own_w is None else (lambda i, w=own_w: [i[0], w])
            rows.append(measure("rmsnorm", (t, hidden), name, fn, make_x, grad_of, ideal))
            print_progress(rows[-1])
    for t in tokens:
        def make_xr(t=t):
            g = torch.Generator(device=DEV).manual_seed(4)
            x, r = (torch.randn(t, hidden, device=DEV, dtype=dtype, generator=g).requires_grad_()
                    for _ in range(2))
            w = (1 + 0.1 * torch.randn(hidden, device=DEV, generator=g)).to(dtype).requires_grad_()
            return x, r, w
        unit = t * hidden * dtype.itemsize  # fwd: read x, r; write y, h. bwd: read dy, dh, h; write dx
        for name, (fn, own_w) in impls.add_rmsnorm_impls(hidden).items():
            grad_of = (lambda i: list(i)) if own_w is None else (lambda i, w=own_w: [i[0], i[1], w])
            rows.append(measure("add+rmsnorm", (t, hidden), name, fn, make_xr, grad_of,
                                (4 * unit, 4 * unit)))
            print_progress(rows[-1])
    for t in tokens:
        for k in splits:
            v = vocab // k

            def make_logits(t=t, v=v):
                g = torch.Generator(device=DEV).manual_seed(1)
                x = (3 * torch.randn(t, v, device=DEV, generator=g)).to(dtype).requires_grad_()
                target = torch.randint(0, v, (t,), device=DEV, generator=g)
                return x, target
            ideal = (t * v * dtype.itemsize, 2 * t * v * dtype.itemsize)
            for name, fn in ce.items():
                # Ours (in backward) and Liger (in forward) overwrite the logits with their
                # gradient, so later calls run on gradient values: finite, and the cost of
                # these kernels does not depend on the values. No clone is timed.
                row = measure("cross_entropy", (t, v), name, fn, make_logits,
                              lambda i: [i[0]], ideal)
                row["split"] = k
                rows.append(row)
                print_progress(row)
    q_heads, kv_heads, d, ffn = (4, 2, 16, 100) if ARGS.dry_run else (32, 8, 128, 14336)
    ropes, glus = impls.rope_impls(), impls.swiglu_impls()
    for t in tokens:
        def make_qk(t=t):
            g = torch.Generator(device=DEV).manual_seed(2)
            q = torch.randn(t, 1, q_heads, d, device=DEV, generator=g).to(dtype).requires_grad_()
            k = torch.randn(t, 1, kv_heads, d, device=DEV, generator=g).to(dtype).requires_grad_()
            return q, k, rope_angles(t, d)
        elems = t * (q_heads + kv_heads) * d * dtype.itemsize
        for name, fn in ropes.items():
            rows.append(measure("rope q+k", (t, 1, q_heads + kv_heads, d), name, fn, make_qk,
                                lambda i: [i[0], i[1]], (2 * elems, 2 * elems)))
            print_progress(rows[-1])
    for t in tokens:
        def make_fc1(t=t):
            g = torch.Generator(device=DEV).manual_seed(3)
            return (torch.randn(t, 2 * ffn, device=DEV, generator=g).to(dtype).requires_grad_(),)
        unit = t * ffn * dtype.itemsize
        for name, fn in glus.items():
            rows.append(measure("swiglu", (t, 2 * ffn), name, fn, make_fc1, lambda i: [i[0]],
                                (3 * unit, 5 * unit)))
            print_progress(rows[-1])
    return rows


def sweep(tokens) -> list[dict]:
    """Our kernels over their launch knobs at the largest token count, whole vocabulary:
    RMSNorm forward (rows/program, warps) and backward (programs/SM, warps) candidates, each
    direction timed alone; cross-entropy vocab block (fwd+bwd)."""
    out, t = [], max(tokens)
    hidden = 256 if ARGS.dry_run else LLAMA3_8B["hidden"]
    vocab = 1000 if ARGS.dry_run else LLAMA3_8B["vocab"]
    x = torch.randn(t, hidden, device=DEV, dtype=torch.bfloat16).requires_grad_()
    w = torch.ones(hidden, device=DEV, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    for cfg in RMS.FWD_CANDIDATES:
        RMS.FORCE["rmsnorm_fwd"] = cfg
        ms = time_ms(lambda _: RMS.rmsnorm(x, w))
        out.append(dict(kernel="rmsnorm fwd", knob="rows/program, warps", value=list(cfg), ms=ms))
    RMS.FORCE.pop("rmsnorm_fwd")
    y = RMS.rmsnorm(x, w)
    for cfg in RMS.BWD_CANDIDATES + [(8, 8, 1), (2, 4, 1), (2, 32, 1), (2, 8, 4)]:
        RMS.FORCE["rmsnorm_bwd"] = cfg
        ms = time_ms(lambda _: torch.autograd.grad(y, [x, w], dy, retain_graph=True))
        out.append(dict(kernel="rmsnorm bwd", knob="programs/SM, warps, rows/step", value=list(cfg), ms=ms))
    RMS.FORCE.pop("rmsnorm_bwd")
    x = w = dy = y = None  # free the RMSNorm buffers before the cross-entropy sweep
    logits = torch.randn(t, vocab, device=DEV, dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (t,), device=DEV)
    default, ones = CE.MAX_BLOCK_V, torch.ones(t, device=DEV)
    for block, warps in ((4096, 8), (8192, 16), (8192, 32), (16384, 16), (16384, 32), (32768, 32)):
        CE.MAX_BLOCK_V, CE.NUM_WARPS = block, warps
        ms = time_ms(lambda _: torch.autograd.grad(CE.cross_entropy(logits, target), [logits], ones))
        out.append(dict(kernel="cross_entropy fwd+bwd", knob="MAX_BLOCK_V, warps",
                        value=[block, warps], ms=ms))
    CE.MAX_BLOCK_V, CE.NUM_WARPS = default, None
    for r in out:
        print(f"  sweep {r['kernel']} {r['knob']}={r['value']}: {r['ms']:.3f} ms")
    return out


def print_progress(row):
    keys = ("fwd_ms", "bwd_ms", "fwd_bwd_ms")
    if all(k in row for k in keys):
        print(f"  {row['kernel']} {row['shape']} {row['impl']}: "
              + " / ".join(f"{row[k]:.3f}" for k in keys) + " ms", flush=True)


def markdown(rows, copy_gbs) -> str:
    lines = ["| kernel | shape | impl | fwd ms | bwd ms | fwd+bwd ms | % copy BW fwd / bwd / both | "
             "peak extra GiB | vs eager |", "|" + "---|" * 9]
    eager = {}
    for r in rows:
        if ("eager" in r["impl"] or "unfused" in r["impl"]) and "fwd_bwd_ms" in r:
            eager.setdefault((r["kernel"], tuple(r["shape"])), r["fwd_bwd_ms"])
    for r in rows:
        if "fwd_bwd_ms" not in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | "
                         f"{r.get('skipped') or r.get('error')} ||||||")
            continue
        base = eager.get((r["kernel"], tuple(r["shape"])))
        peak = "-" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
        pct = " / ".join(f"{100 * r[k] / copy_gbs:.0f}%" for k in ("fwd_gbs", "bwd_gbs", "gbs"))
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | "
            f"{r['fwd_bwd_ms']:.3f} | {pct} | {peak} | "
            f"{(base / r['fwd_bwd_ms']) if base else float('nan'):.2f}x |")
    return "\n".join(lines)


def main():
    if DEV.type != "cuda" and not ARGS.dry_run:
        raise SystemExit("bench_kernels: no CUDA device; use --dry-run to check the script on CPU")
    card = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (dry run, Triton interpreter)"
    tokens = [16, 24] if ARGS.dry_run else [int(t) for t in ARGS.tokens.split(",")]
    splits = [1, 2] if ARGS.dry_run else [int(k) for k in ARGS.splits.split(",")]
    if ARGS.dry_run:  # timings mean nothing here: no warm-up; 2 reps still call each twice
        ARGS.reps, ARGS.warmup = 2, 0
    import triton
    print(f"# megasyne kernel benchmark on {card} (torch {torch.__version__}, triton {triton.__version__})")
    if ARGS.dry_run:
        print("DRY RUN: tiny shapes under the Triton interpreter; timings mean nothing.")

    checks = check_correctness()
    bad = [c for c in checks if not c["ok"]]
    print(f"correctness: {len(checks) - len(bad)}/{len(checks)} checks within 1 ulp of float64")
    for c in bad:
        print(f"  FAIL {c}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s")
    rows = run_cases(tokens, splits)
    tuning = sweep(tokens) if ARGS.sweep else []
    tuned = [dict(name=k[0], key=[str(v) for v in k[1]], chosen=list(min(t, key=lambda e: e[1])[0]),
                  ms=[[list(c), round(ms, 4)] for c, ms in t])
             for k, t in RMS.TUNING_TIMINGS.items()]  # the tuner keeps the fastest
    for tnd in tuned:
        print(f"  tuner {tnd['name']} {tnd['key']}: chose {tnd['chosen']} from {tnd['ms']}")
    table = markdown(rows, copy_gbs)
    print("\n" + table)
    print("\nCE splits are simulated on one device (shard of V/k columns, world-size-1 math, "
          "no all-reduce). GB/s uses the minimum-traffic model in the docstring.")
    if SKIPPED:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in SKIPPED.items()))
    result = dict(card=card, dry_run=ARGS.dry_run, torch=torch.__version__, triton=triton.__version__,
                  copy_gbs=copy_gbs, correctness=checks, results=rows, sweep=tuning, tuner=tuned,
                  skipped=SKIPPED,
                  wall_s=round(time.perf_counter() - T0, 1), note="CE splits simulated on one device")
    if ARGS.out:
        Path(ARGS.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {ARGS.out}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
