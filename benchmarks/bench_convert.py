"""Peak memory and time of HF <-> megasyne conversion on a TinyLlama-1.1B-shaped model.

    python benchmarks/bench_convert.py                       # TinyLlama-1.1B shapes, fp32
    python benchmarks/bench_convert.py --model llama3_8b --dtype bfloat16 --skip-naive

1. Makes a random-weight Hugging Face checkpoint with TinyLlama-1.1B's shapes (22 layers,
   hidden 2048, 32 heads / 4 KV heads, FFN 5632, vocab 32000, untied; ``transformers.LlamaConfig``
   + ``save_pretrained``, sharded safetensors; nothing downloaded) in a scratch directory
   (``--model llama3_8b``: Llama-3-8B's shapes, streamed to safetensors, see MAKE_HF_STREAMING).
2. Runs ``tools/convert_hf.py hf-to-megasyne`` (one process) and ``megasyne-to-hf`` as fresh
   subprocesses and records wall time and peak memory: the process's ``ru_maxrss`` (from
   ``wait4``; this script keeps its own memory small, since a child's maxrss starts at its
   parent's RSS at fork time) and the peak PSS of its process tree (psutil, every 50 ms;
   PSS, not RSS, so that pages shared with forked writer processes count once).
3. For scale: the same numbers for (a) only importing what the converter imports, and (b) a
   naive conversion that loads the whole HF state dict, builds the real TP1 model and saves
   it with ``save_checkpoint`` (what a converter without streaming does).
4. Checks the round trip: every tensor of the HF output equals the input (bit for bit).

The scratch directory (``--work``, default a temp dir; 3 x the model size: ~13 GB for
TinyLlama in fp32, ~48 GB for Llama-3-8B in bf16) is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

IMPORTS_ONLY = """
import megasyne, megasyne.checkpoint.hf_convert, megatron.core.dist_checkpointing
import megasyne.model.builder, torch.distributed.checkpoint
"""

NAIVE = """
import sys, megasyne, torch
from safetensors.torch import load_file
from megasyne.checkpoint.hf import HFCheckpoint, llama_config_from_hf, param_maps, to_megatron
from megasyne.checkpoint.dist import save_checkpoint
from megasyne.checkpoint.sharding import load_full_state
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
hf_dir, out = sys.argv[1], sys.argv[2]
ckpt = HFCheckpoint(hf_dir)
cfg = llama_config_from_hf(ckpt.config)
state = {}
for f in sorted(set(ckpt._file_of.values())):
    state.update(load_file(f))                          # whole HF state dict in memory
full = {pm.megatron: to_megatron(pm, [state.pop(n) for n in pm.hf], cfg, cfg.padded_vocab_size(1))
        for pm in param_maps(cfg)}                       # whole Megatron state dict
init_parallel(ParallelDims())
chunks = build_model(cfg, ParallelDims(), ModelRuntime(init_weights=False))  # real model
load_full_state(chunks[0], full, 0, 1)
save_checkpoint(out, 0, chunks, model_config=cfg.to_dict(), layout={})
"""


MAKE_HF = """
import json, sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(**json.loads(sys.argv[2]))
model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, sys.argv[3]))
model.save_pretrained(sys.argv[1], max_shard_size="2GB")
"""


# Llama-3-8B-shaped input (--model llama3_8b): a transformers model of that size would not
# even fit this machine in fp32, so the random weights are streamed into safetensors files
# (format checked against the safetensors library in tests/checkpoint/test_hf_mapping.py).
MAKE_HF_STREAMING = """
import json, pathlib, sys, torch
import megasyne
from megasyne.checkpoint.hf import SafetensorsStreamWriter, hf_config_from_llama, hf_shapes, plan_shards
from megasyne.model.presets import get_preset
out, cfg, dtype = pathlib.Path(sys.argv[1]), get_preset(sys.argv[2]), getattr(torch, sys.argv[3])
out.mkdir(parents=True)
shards = plan_shards([(n, s, dtype) for n, s in hf_shapes(cfg).items()], 5 * 10**9)
g, weight_map, total = torch.Generator().manual_seed(0), {}, 0
for i, shard in enumerate(shards):
    f = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    w = SafetensorsStreamWriter(out / f, shard)
    total += w.total_bytes
    for name, shape, _ in shard:
        t = (torch.randn(shape, generator=g) * 0.02) if len(shape) > 1 else torch.ones(shape)
        w.write(name, t.to(dtype))
        weight_map[name] = f
    w.close()
(out / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
(out / "config.json").write_text(json.dumps(hf_config_from_llama(cfg, dtype=dtype)))
"""


def make_hf(path: str, model: str, dtype: str) -> float:
    """In a subprocess: this process must stay small (see the module docstring)."""
    t0 = time.time()
    if model == "tinyllama_1_1b":
        cmd = [sys.executable, "-c", MAKE_HF, path, json.dumps(TINYLLAMA), dtype]
    else:
        cmd = [sys.executable, "-c", MAKE_HF_STREAMING, path, model, dtype]
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - t0


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time, its ru_maxrss and the peak PSS of its process tree."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    peak = [0]
    done = threading.Event()

    def sample():
        try:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
                time.sleep(0.05)
        except psutil.Error:
            pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return dict(wall_s=round(time.time() - t0, 1), maxrss_mib=round(usage.ru_maxrss / 1024),
                tree_peak_pss_mib=round(peak[0] / 2**20))


def compare(a: str, b: str) -> int:
    import torch

    from megasyne.checkpoint.hf import HFCheckpoint

    x, y = HFCheckpoint(a), HFCheckpoint(b)
    if sorted(x.names()) != sorted(y.names()):
        raise SystemExit("round trip: tensor names differ")
    for name in x.names():
        if not torch.equal(x.get(name), y.get(name)):
            raise SystemExit(f"round trip: {name} differs")
    return len(x.names())


def dir_mib(path: str) -> int:
    return round(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path)
                     for f in fs) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tinyllama_1_1b", choices=["tinyllama_1_1b", "llama3_8b"])
    ap.add_argument("--out", default=None,
                    help="results JSON (default benchmarks/results/convert_<model>_<dtype>.json)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    args.out = args.out or os.path.join(
        REPO, f"benchmarks/results/convert_{args.model}_{args.dtype}.json")
    work = args.work or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    hf, ms, back, naive = (os.path.join(work, n) for n in ("hf", "megasyne", "hf_back", "naive"))
    py, tool = sys.executable, os.path.join(REPO, "tools/convert_hf.py")
    try:
        results = {"make_hf_s": round(make_hf(hf, args.model, args.dtype), 1),
                   "hf_mib": dir_mib(hf)}
        print(f"random {args.model}-shaped HF checkpoint: {results['hf_mib']} MiB", flush=True)
        runs = {"imports only": [py, "-c", IMPORTS_ONLY],
                "hf-to-megasyne": [py, tool, "hf-to-megasyne", "--hf-dir", hf, "--output", ms,
                                   "--no-progress"],
                "megasyne-to-hf": [py, tool, "megasyne-to-hf", "--checkpoint", ms, "--output",
                                   back, "--no-progress", "--max-shard-size", "2GB"]}
        if not args.skip_naive:
            runs["naive hf-to-megasyne (whole model in memory)"] = [py, "-c", NAIVE, hf, naive]
        results["runs"] = {}
        for name, cmd in runs.items():
            results["runs"][name] = measure(cmd)
            print(f"{name}: {results['runs'][name]}", flush=True)
        results["megasyne_mib"] = dir_mib(ms)
        results["round_trip_tensors_equal"] = compare(hf, back)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import megatron.core
    import torch
    import transformers

    results["meta"] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        python=platform.python_version(), torch=torch.__version__,
        megatron_core=megatron.core.__version__, transformers=transformers.__version__,
        dtype=args.dtype, model=args.model,
        command=f"python benchmarks/bench_convert.py --model {args.model} --dtype {args.dtype}"
                + (" --skip-naive" if args.skip_naive else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
