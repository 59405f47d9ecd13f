"""Training time blocked per checkpoint save: synchronous vs asynchronous (async_save).

Builds a TinyLlama-1.1B-shaped model (hidden 2048, GQA 32/4, FFN 5632, vocabulary 32000) with
``--layers`` of its 22 layers, fp32, on one process (gloo, CPU unless CUDA is there), Megatron
DDP and its Adam (torch's AdamW without apex/TE), with Adam's two moments filled (random, so
every page is real memory), and saves it ``--saves`` times each way into ``--dir``:

- sync: ``dist.save_checkpoint``; training is blocked for the whole call.
- async: ``AsyncCheckpointer.start`` (blocked: plan, snapshot, fork), then "training": an
  in-place update of every parameter and both Adam moments, repeated until the background
  writer is done (what an optimizer step touches, so the copy-on-write cost is paid), then
  ``wait`` (publication: Megatron's finalisation, checksums, manifest, rename).

Reported per save: blocked seconds (async: the start plus the publication, which the
trainer's per-step check runs in the training loop), seconds until published, bytes written,
and the time of each such update with and without a write in flight (the first update after
the fork pays the copy-on-write of every page it touches). Prints one JSON object.

    python benchmarks/bench_async_save.py --layers 4 --saves 2 --dir /tmp/bench_async
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)


def _build(layers: int):
    import torch

    from megasyne.checkpoint.dist import _materialise_torch_adam_state, _torch_optimizers
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.model.presets import tinyllama_1_1b
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import init_parallel
    from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp

    dims = ParallelDims()
    init_parallel(dims, seed=0)
    cfg = dataclasses.replace(tinyllama_1_1b(), num_layers=layers)
    chunks = wrap_ddp(build_model(cfg, dims, ModelRuntime()), dims)
    optimizer = build_optimizer(chunks, dims, OptimConfig(lr=1e-4))
    _materialise_torch_adam_state(optimizer)
    tensors = []
    for opt in _torch_optimizers(optimizer):
        for state in opt.state.values():
            state["exp_avg"].normal_(0, 1e-3)
            state["exp_avg_sq"].uniform_(0, 1e-6)
            tensors += [state["exp_avg"], state["exp_avg_sq"]]
    params = [p for c in chunks for p in c.parameters()]
    n_params = sum(p.numel() for p in params)
    return cfg, dims, chunks, optimizer, params + tensors, n_params, torch


def _update(tensors, torch) -> float:
    """What an optimizer step writes: every parameter and both moments, in place."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in tensors:
            t.mul_(0.999999)
    return time.perf_counter() - t0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="of TinyLlama's 22")
    ap.add_argument("--saves", type=int, default=2, help="per mode")
    ap.add_argument("--dir", default="/tmp/bench_async_save")
    args = ap.parse_args()

    from megasyne.checkpoint import dist as ckpt
    from megasyne.checkpoint.async_save import AsyncCheckpointer

    cfg, dims, chunks, optimizer, tensors, n_params, torch = _build(args.layers)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    what = dict(model_config=cfg.to_dict(), layout=dims.layout_dict(), optimizer=optimizer,
                keep_last=1)
    idle_update = min(_update(tensors, torch) for _ in range(3))
    sync, asynch = [], []
    step = 0
    for _ in range(args.saves):
        step += 1
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(root, step, chunks, **what)
        sync.append(dict(blocked_s=time.perf_counter() - t0, bytes=_size(path)))
    saver = AsyncCheckpointer(log=lambda *a: None)
    for _ in range(args.saves):
        step += 1
        t0 = time.perf_counter()
        saver.start(root, step, chunks, **what)
        blocked = time.perf_counter() - t0
        updates = []
        while saver.pending.writer is not None and saver.pending.writer.is_alive():
            updates.append(_update(tensors, torch))
        t1 = time.perf_counter()
        path = saver.wait()
        published = time.perf_counter() - t0
        asynch.append(dict(blocked_s=blocked, written_s=t1 - t0, publish_s=published - (t1 - t0),
                           blocked_total_s=blocked + published - (t1 - t0),
                           until_published_s=published, bytes=_size(path),
                           updates_during_write=[round(u, 3) for u in updates]))
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(),
        cpus=os.cpu_count(), cuda=torch.cuda.is_available(), torch=torch.__version__,
        model=f"tinyllama_1_1b, {args.layers} of 22 layers, fp32", params=n_params,
        state_gib=round(n_params * 16 / 2**30, 2),  # params + grads + 2 Adam moments
        update_s_idle=idle_update, sync=sync, **{"async": asynch}), indent=1))


if __name__ == "__main__":  # the write's Manager is a "spawn" process: it re-imports this
    main()
