"""Per-rank throughput of tools/score_ppl.py on CPU: 1 process, then torchrun DP2 (gloo).

    PYTHONPATH=$PWD python benchmarks/bench_score_ppl.py                 # SmolLM2-135M shapes
    PYTHONPATH=$PWD python benchmarks/bench_score_ppl.py --docs 16 --ranks 1 2

1. Makes a random-weight Hugging Face Llama with SmolLM2-135M's shapes (30 layers, hidden 576,
   9 heads / 3 KV heads, FFN 1536, vocabulary 49152, tied embeddings; ``transformers.LlamaConfig``,
   nothing downloaded) and converts it with tools/convert_hf.py into a megasyne checkpoint.
2. Writes a dataset of ``--docs`` documents of random tokens, lengths uniform in [64, 1024).
3. Scores it with the tool, fp32, window 512 / stride 512, batch 8, blocks of 4 documents: once
   as one process, once per ``--ranks`` entry under torchrun (DP = ranks, TP1). Every rank runs
   one torch thread (OMP_NUM_THREADS=1), so a rank is one core's worth of work.
4. Prints a markdown table from the tool's reports: per rank, rank 0's scored tokens and
   documents over its scoring time (the loop over its blocks; model loading and start-up not
   included); for the job, all tokens and documents over the scoring call's time on rank 0 (until
   every rank is done and the field written); and the whole command's wall time. On a shared
   machine the wall-clock rates fall with the load; rank 0's tokens per CPU-second of its
   scoring loop (one thread) say what a rank does with a core of its own. Writes the reports
   and the load averages as JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)
WINDOW, BATCH, BLOCK = 512, 8, 4


def make_inputs(work: str, docs: int) -> tuple[str, str, int]:
    """Random model (HF, then megasyne) and dataset; returns (checkpoint, prefix, tokens)."""
    import numpy as np
    import torch
    import transformers

    from megasyne.data.indexed_dataset import IndexedDatasetWriter

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))
    model.save_pretrained(os.path.join(work, "hf"))
    ckpt = os.path.join(work, "ms")
    subprocess.run([sys.executable, "tools/convert_hf.py", "hf-to-megasyne", "--hf-dir",
                    os.path.join(work, "hf"), "--output", ckpt, "--no-progress"], cwd=REPO, check=True,
                   env=_env(), capture_output=True)
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 1024, docs)
    prefix = os.path.join(work, "docs")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for n in lengths:
            w.add_document(rng.integers(0, SMOLLM2_135M["vocab_size"], int(n)))
    return ckpt, prefix, int(lengths.sum())


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def score(ckpt: str, prefix: str, ranks: int) -> dict:
    """One run of the tool at ``ranks`` processes (DP); returns its report + wall seconds."""
    field = f"ppl_r{ranks}"
    tool = ["tools/score_ppl.py", "--data-prefix", prefix, "--checkpoint", ckpt, "--field", field,
            "--window", str(WINDOW), "--batch-size", str(BATCH), "--block-size", str(BLOCK),
            "--no-progress"]
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    t0 = time.perf_counter()
    proc = subprocess.run(launch + tool, cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"score_ppl at {ranks} rank(s) failed:\n{proc.stderr[-4000:]}")
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    return dict(report, wall_seconds=round(wall, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=32, help="documents to score (default 32)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="ranks per run (DP)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/score_ppl.json"))
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_score_ppl_") as work:
        ckpt, prefix, tokens = make_inputs(work, args.docs)
        runs = {n: score(ckpt, prefix, n) for n in args.ranks}
    rows = ["| ranks (DP) | tokens/s per rank | docs/s per rank | tokens per CPU-s per rank "
            "| tokens/s, job | docs/s, job | scoring s (rank 0 / job) | command wall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in runs.items():
        secs, job = r["scoring_seconds_rank0"], r["seconds"]  # job: every rank done, assembled
        cpu = r["scoring_cpu_seconds_rank0"]
        rows.append(f"| {n} | {r['tokens_per_s_rank0']:.0f} | {r['docs_scored_rank0'] / secs:.2f} "
                    f"| {r['tokens_scored_rank0'] / cpu:.0f} "
                    f"| {r['tokens_scored'] / job:.0f} | {r['documents'] / job:.2f} "
                    f"| {secs:.1f} / {job:.1f} | {r['wall_seconds']:.1f} |")
    print(f"{args.docs} documents, {tokens} tokens, SmolLM2-135M shapes (random), fp32, window "
          f"{WINDOW}, batch {BATCH}, blocks of {BLOCK}; 1-minute load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("\n".join(rows))
    result = dict(date=datetime.date.today().isoformat(), machine=platform.machine(),
                  cpus=os.cpu_count(), docs=args.docs, tokens=tokens, model=SMOLLM2_135M,
                  window=WINDOW, batch=BATCH, block=BLOCK, runs=runs,
                  loadavg_before=load_before, loadavg_after=os.getloadavg())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
