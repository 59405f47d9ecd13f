"""Compile every Triton kernel of megasyne for real GPUs, on a machine without one.

    python benchmarks/kernel_resources.py                  # sm_90 (H100/H200) and sm_80 (A100)
    python benchmarks/kernel_resources.py --arch 90 --json resources.json

Why: CI has no GPU, so the kernels' tests run under the Triton interpreter, which accepts
programs the compiler rejects (and computes some things differently). A kernel that only
fails to compile on the card would cost a whole lent GPU call to find. Triton's compiler
needs no GPU up to the cubin (its LLVM and the ptxas it ships), so this script drives the
real host launchers (``megasyne.kernels.*``) on small CPU tensors whose *columns* are the
production sizes, with a stand-in Triton driver that names the target card; every launch
compiles the kernel that the card would run (same constexprs, warps, integer
specialisations) and launches nothing. The output tensors stay unwritten; only
compilation is checked.

For each compiled kernel it reports what ptxas allotted per thread: registers, local memory
(LOCAL > 0 means spills to local memory, i.e. extra HBM/L1 traffic in a bandwidth-bound
kernel), and shared memory per program, against the card's limits. Exit status 1 if any
kernel fails to compile or exceeds a limit; spills are reported (``--no-spills`` makes them
an error too).

Covered launches: RMSNorm forward (every launch-tuner candidate that fits) and backward
(every candidate), with and without the fused residual, bf16/fp16/fp32, hidden 2048
(TinyLlama), 4096 (Llama-3-8B), 1000 (odd) and a looped width; cross-entropy forward
(one rank and the vocab-parallel phase 1), backward, the scalar-reduction forward-with-gradient
and its rescale, at vocab 32000 and 128256 whole and split 2/4/8, and 1023; RoPE forward and
backward at TinyLlama and Llama-3-8B q/k shapes (and a TP shard, and a partial rotary dim);
SwiGLU forward and backward (also in place) at FFN 5632 and 14336 (and a TP shard).

Runs with TRITON_INTERPRET=0, set by ``main`` before anything imports the kernels (``import
megasyne`` turns the interpreter on when there is no CUDA, and it replaces @triton.jit at
import time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Per-program limits of each target: max dynamic shared memory per block (bytes) and max
# registers per thread (CUDA compute capability tables).
LIMITS = {80: dict(shared=163 * 1024, regs=255), 90: dict(shared=227 * 1024, regs=255)}


@dataclass
class Compiled:
    kernel: str
    arch: int
    case: str
    constexprs: dict
    num_warps: int
    regs: int = -1
    local_bytes: int = -1
    shared_bytes: int = -1
    seconds: float = 0.0
    error: str | None = None
    problems: list = field(default_factory=list)


class _FakeDriver:
    """The three things JITFunction.run asks a driver for, naming a card that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # JITFunction caches its binder and kernels per device id: one id per target, so a
        # second target in the same process compiles afresh instead of reusing the first's.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """{'REG': n, 'LOCAL': bytes, 'SHARED': bytes} of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            return {k: int(v) for k, v in (kv.split(":")[:2] for kv in line.split()
                                           if kv.split(":")[0] in ("REG", "LOCAL", "SHARED"))}
    raise RuntimeError(f"no resource usage line in cuobjdump output:\n{out}")


_TRITON_RUN: dict = {}


class Recorder:
    """Replaces JITFunction.run: compile for the target (warmup=True launches nothing)."""

    def __init__(self, arch: int):
        import triton

        self.arch = arch
        self.case = ""
        self.records: list[Compiled] = []
        self._seen: set = set()
        self._cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
                              / "cuobjdump")

    def install(self):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        driver.set_active(_FakeDriver(self.arch))
        # Triton's own run, kept from the first install: a later Recorder (another target)
        # replaces this one's wrapper instead of wrapping it.
        original = _TRITON_RUN.setdefault("run", JITFunction.run)
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            name = fn.fn.__name__
            try:
                kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure is reported, then re-raised
                recorder.records.append(Compiled(name, recorder.arch, recorder.case, {}, -1,
                                                 error=f"{type(err).__name__}: {err}"))
                raise
            recorder._record(name, kernel, time.perf_counter() - t0)
            return kernel

        JITFunction.run = run

    def _record(self, name, kernel, seconds):
        meta = kernel.metadata
        key = (name, kernel.hash)
        if key in self._seen:  # the same binary again (another case with the same specialisation)
            return
        self._seen.add(key)
        consts = {}
        for path, value in kernel.src.constants.items():
            label = kernel.src.fn.arg_names[path[0]] if len(path) == 1 else str(path)
            if label.isupper():  # our constexpr knobs are upper case (BLOCK, ROWS, HAS_RES, ...)
                consts[label] = value
        usage = _resource_usage(kernel.asm["cubin"], self._cuobjdump)
        rec = Compiled(name, self.arch, self.case, consts, meta.num_warps, usage["REG"],
                       usage["LOCAL"], max(meta.shared, usage["SHARED"]), round(seconds, 2))
        rec.problems = problems(rec)
        self.records.append(rec)


def problems(rec: Compiled) -> list[str]:
    """What is wrong with a compiled kernel on its target: over a per-program limit, or spills."""
    out = []
    limits = LIMITS.get(rec.arch)
    if limits and rec.shared_bytes > limits["shared"]:
        out.append(f"shared {rec.shared_bytes} B > {limits['shared']} B")
    if limits and rec.regs > limits["regs"]:
        out.append(f"{rec.regs} registers > {limits['regs']}")
    if rec.local_bytes > 0:
        out.append(f"spills: {rec.local_bytes} B local memory per thread")
    return out


# --------------------------------------------------------------------------------------
# The launches: real host launchers, small row counts, production column sizes
# --------------------------------------------------------------------------------------


def _rows_for(n: int) -> list[int]:
    # Integers are specialised on (== 1, % 16 == 0): cover a multiple of 16 (production
    # token counts) and an odd count.
    return [64, 37][:n]


def rmsnorm_cases(rec: Recorder, full: bool):
    import torch

    from megasyne.kernels import rmsnorm as rms

    widths = [(2048, torch.bfloat16), (4096, torch.bfloat16), (1000, torch.bfloat16)]
    if full:
        widths += [(4096, torch.float32), (4096, torch.float16), (rms.MAX_FUSED_BLOCK + 1000,
                                                                  torch.bfloat16)]
    for h, dtype in widths:
        fwd, bwd = rms.fwd_candidates(h), rms.bwd_candidates(h)
        for rows in _rows_for(2 if full else 1):
            x = torch.randn(rows, h, dtype=dtype)
            w = torch.randn(h, dtype=dtype)
            for residual in (None, torch.randn_like(x)):
                tag = f"rmsnorm H={h} {str(dtype)[6:]} rows={rows}" + (" +res" if residual is not None else "")
                for cfg in fwd:
                    rec.case = f"{tag} fwd {cfg}"
                    rms.FORCE["rmsnorm_fwd"] = cfg
                    _, hsum, rrms = rms.rmsnorm_forward(x, w, 1e-5, residual=residual)
                for cfg in bwd:
                    rec.case = f"{tag} bwd {cfg}"
                    rms.FORCE["rmsnorm_bwd"] = cfg
                    rms.rmsnorm_backward(torch.randn_like(x), x, w, rrms,
                                         dres=None if residual is None else torch.randn_like(x))
    rms.FORCE.clear()


def cross_entropy_cases(rec: Recorder, full: bool):
    import torch

    from megasyne.kernels import cross_entropy as ce

    vocabs = [(32000, 1), (128256, 1), (128256 // 4, 4)]
    if full:
        vocabs += [(128256 // 2, 2), (128256 // 8, 8), (1023, 1)]
    dtypes = [torch.bfloat16] + ([torch.float32, torch.float16] if full else [])
    for v, split in vocabs:
        for dtype in dtypes if v == 128256 else [torch.bfloat16]:
            for rows in _rows_for(2 if full else 1):
                tag = f"ce V={v}{f' (1/{split})' if split > 1 else ''} {str(dtype)[6:]} rows={rows}"
                target = torch.randint(0, v, (rows,))
                logits = torch.randn(rows, v, dtype=dtype)
                rec.case = f"{tag} fwd"
                loss, lse = ce.ce_forward(logits, target, 0, v * split, -100, 0.0, 0.0)
                rec.case = f"{tag} bwd"
                ce.ce_backward_(logits, target, lse, torch.ones(rows), 0, v * split, -100, 0.0, 0.0)
                if split > 1:  # ce_forward's phase 1 with a TP group (before its all-reduces)
                    rec.case = f"{tag} vocab-parallel phase 1"
                    ce.local_stats(logits, target, v, v * split, -100, 0.0, 0.0)
                else:
                    for reduction in ("mean", "sum"):
                        rec.case = f"{tag} {reduction} (grad in forward, rescale)"
                        x = torch.randn(rows, v, dtype=dtype, requires_grad=True)
                        ce.cross_entropy(x.clone(), target, reduction=reduction).backward(
                            torch.tensor(2.0))


def rope_cases(rec: Recorder, full: bool):
    import torch

    from megasyne.kernels import rope as rp

    # (heads, head dim, rotary dim): TinyLlama q/k, Llama-3-8B q/k, a TP-2 shard, partial rotary
    shapes = [(32, 64, 64), (4, 64, 64), (32, 128, 128), (8, 128, 128)]
    if full:
        shapes += [(16, 128, 128), (4, 128, 128), (6, 96, 64)]
    for n, d, r in shapes:
        s, b = 16, 2
        t = torch.randn(s, b, n, d, dtype=torch.bfloat16)
        cos, sin = torch.randn(s, r), torch.randn(s, r)
        for backward in (False, True):
            rec.case = f"rope n={n} d={d} r={r} {'bwd' if backward else 'fwd'}"
            rp.rope_apply(t, cos, sin, backward=backward)


def swiglu_cases(rec: Recorder, full: bool):
    import torch

    from megasyne.kernels import swiglu as sw

    ffns = [5632, 14336] + ([14336 // 2, 1000] if full else [])
    for f in ffns:
        for rows in _rows_for(2 if full else 1):
            x = torch.randn(rows, 2 * f, dtype=torch.bfloat16)
            rec.case = f"swiglu F={f} rows={rows} fwd"
            y = sw.swiglu_forward(x)
            rec.case = f"swiglu F={f} rows={rows} bwd"
            sw.swiglu_backward(torch.randn_like(y), x)
            rec.case = f"swiglu F={f} rows={rows} bwd in place"
            sw.swiglu_backward(torch.randn_like(y), x, inplace=True)


CASES = {"rmsnorm": rmsnorm_cases, "cross_entropy": cross_entropy_cases, "rope": rope_cases,
         "swiglu": swiglu_cases}


def compile_all(arch: int, full: bool, only: list[str] | None = None) -> list[Compiled]:
    rec = Recorder(arch)
    rec.install()
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        try:
            fn(rec, full)
        except Exception:  # noqa: BLE001 - recorded by the Recorder (or here), keep going
            if not rec.records or rec.records[-1].error is None:
                import traceback

                rec.records.append(Compiled(name, arch, rec.case, {}, -1,
                                            error=traceback.format_exc(limit=3)))
    return rec.records


def table(records: list[Compiled]) -> str:
    lines = ["| arch | kernel | constexprs | warps | regs | local B | shared B | s | case |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        consts = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        if r.error:
            lines.append(f"| sm_{r.arch} | {r.kernel} | COMPILE ERROR | | | | | | {r.case}: "
                         f"{r.error.splitlines()[-1][:200]} |")
            continue
        lines.append(f"| sm_{r.arch} | {r.kernel} | {consts} | {r.num_warps} | {r.regs} | "
                     f"{r.local_bytes} | {r.shared_bytes} | {r.seconds} | {r.case} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append",
                    help="compute capability x 10 (90 = H100/H200, 80 = A100); repeatable; "
                         "default both")
    ap.add_argument("--quick", action="store_true",
                    help="production shapes only (bf16, one row count), not the odd ones")
    ap.add_argument("--only", action="append", choices=sorted(CASES),
                    help="only these kernels (repeatable)")
    ap.add_argument("--no-spills", action="store_true", help="spills are an error too")
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args(argv)
    # Before anything imports megasyne (it turns the interpreter on without CUDA). Only here,
    # not at import: a process that imports this module (pytest) keeps its own setting.
    interpret = os.environ.setdefault("TRITON_INTERPRET", "0")
    if interpret not in ("", "0"):
        ap.error(f"TRITON_INTERPRET={interpret}: the interpreter would replace the kernels; unset it")
    t0 = time.perf_counter()
    records = []
    for arch in args.arch or [90, 80]:
        records += compile_all(arch, full=not args.quick, only=args.only)
    print(table(records))
    errors = [r for r in records if r.error]
    limits = [r for r in records if any(not p.startswith("spills") for p in r.problems)]
    spills = [r for r in records if any(p.startswith("spills") for p in r.problems)]
    print(f"\n{len(records)} distinct kernels compiled in {time.perf_counter() - t0:.0f} s: "
          f"{len(errors)} failed, {len(limits)} over a limit, {len(spills)} spill")
    for r in errors + limits + spills:
        print(f"  sm_{r.arch} {r.kernel} [{r.case}]: {r.error or '; '.join(r.problems)}")
    if args.json:
        from megasyne.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps([asdict(r) for r in records], indent=1))
    return 1 if errors or limits or (args.no_spills and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
