"""Where one training step's time goes: kernels by category, and how long the GPU sat idle.

The first GPU profile (BENCHMARKS.md) listed only the top 20 kernels, which left the
question open that decides what to fuse next: is the rest of the step element-wise work,
or is the GPU waiting for the host (Python launch overhead, host syncs)? This module
profiles one step and answers both:

- ``busy_ms``: the sum of every kernel's device time (one stream, so no double counting
  of overlap worth mentioning); ``idle_ms`` = host wall time of the step - busy_ms;
- ``categories``: busy time split into GEMM, attention, our Triton kernels, optimizer,
  copies/casts and other element-wise work, by kernel name (``kernel_category``);
- ``host_syncs`` (CUDA): in one more step, how often the host waited for the GPU and on
  which Python lines (``torch.cuda.set_sync_debug_mode("warn")``): each is a queue drain.

On a CPU (the dry run) the same report is made from the aten ops' self CPU time, so the
code path is exercised in CI; its numbers mean nothing.
"""

from __future__ import annotations

import os
import time

import torch

# (category, name fragments); names are lower-cased, the first matching category wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("megasyne triton", ("_rmsnorm_", "_ce_fwd", "_ce_bwd", "_scale_rows", "_rope_kernel",
                         "_swiglu_", "_vocab_parallel")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "_efficient_attention")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::baddbmm", "aten::_addmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm")),
    ("copy / cast / cat", ("memcpy", "memset", "copy", "catarray", "aten::cat", "aten::fill",
                           "aten::zero")),
    ("nccl / gloo", ("nccl", "gloo", "c10d")),
)
OTHER = "other element-wise / reduce"


def kernel_category(name: str) -> str:
    """Category of a CUDA kernel (or, on CPU, an aten op) by its name."""
    low = name.lower()
    for category, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return OTHER


def summarise(events: list[tuple[str, int, float]], wall_ms: float, top: int = 25) -> dict:
    """Report from (name, calls, self time ms) rows of one profiled step."""
    events = sorted((e for e in events if e[2] > 0), key=lambda e: e[2], reverse=True)
    busy = sum(e[2] for e in events)
    category = {name: kernel_category(name) for name, _, _ in events}
    categories: dict[str, dict] = {}
    for name, calls, ms in events:
        c = categories.setdefault(category[name], dict(ms=0.0, calls=0, kernels=0))
        c["ms"] += ms
        c["calls"] += calls
        c["kernels"] += 1
    for c in categories.values():
        c["share_of_step"] = c["ms"] / wall_ms if wall_ms > 0 else None
    categories = dict(sorted(categories.items(), key=lambda kv: kv[1]["ms"], reverse=True))
    return dict(
        wall_ms=wall_ms, busy_ms=busy, idle_ms=max(wall_ms - busy, 0.0),
        kernel_launches=sum(e[1] for e in events),
        categories=categories,
        top=[dict(name=n[:90], calls=c, self_ms=ms, category=category[n],
                  share_of_step=ms / wall_ms if wall_ms > 0 else None)
             for n, c, ms in events[:top]],
    )


def profile_step(step_fn, top: int = 25) -> dict:
    """Profile one call of ``step_fn`` (after warm-up): see the module docstring."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for e in prof.key_averages():
        if cuda:  # rows with self device time are the kernels (and memcpy/memset)
            ms = getattr(e, "self_device_time_total", 0) / 1e3
        else:     # CPU dry run: leaf aten ops by self CPU time
            ms = e.self_cpu_time_total / 1e3 if e.key.startswith("aten::") else 0.0
        rows.append((e.key, e.count, ms))
    report = summarise(rows, wall_ms, top)
    report["device"] = "cuda" if cuda else "cpu (dry run: aten ops' self CPU time)"
    report["host_syncs"] = count_host_syncs(step_fn)  # a separate step: no profiler in it
    return report


def sync_sites(caught: list, top: int = 8) -> dict:
    """{count, sites: ["file:line xN", ...]} from warnings recorded under
    ``torch.cuda.set_sync_debug_mode("warn")`` (each names the Python line that synced)."""
    from collections import Counter

    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in syncs)
    return dict(count=len(syncs), sites=[f"{k} x{n}" for k, n in sites.most_common(top)])


def count_host_syncs(step_fn) -> dict | None:
    """Run one more step with CUDA's sync debug mode on: how many times the host waited for
    the GPU (.item(), .cpu(), a copy to pageable memory, ...) and where. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sync_sites(caught)


def format_report(report: dict) -> str:
    lines = [f"    step {report['wall_ms']:.1f} ms: kernels busy {report['busy_ms']:.1f} ms, "
             f"idle {report['idle_ms']:.1f} ms, {report['kernel_launches']} launches"]
    syncs = report.get("host_syncs")
    if syncs is not None:
        lines.append(f"    host syncs in a step: {syncs['count']} ({'; '.join(syncs['sites'])})")
    for name, c in report["categories"].items():
        share = c["share_of_step"] or 0.0
        lines.append(f"    {share:6.1%} {c['ms']:8.2f} ms x{c['calls']:<6d} {name}")
    lines.append("    top kernels:")
    for row in report["top"]:
        share = row["share_of_step"] or 0.0
        lines.append(f"    {share:6.1%} {row['self_ms']:8.2f} ms x{row['calls']:<5d} "
                     f"[{row['category']}] {row['name']}")
    return "\n".join(lines)
