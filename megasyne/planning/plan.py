"""The full-scale rehearsal of a run: what it will do and whether it fits, without its GPUs.

``plan(cfg, options)`` takes a run config at its real size and world size and, in this one CPU
process:

1. builds the recipe's real mixture index (stand-in datasets for corpora this machine does not
   hold: ``megasyne.planning.standins``) and runs the trainer's own checks of the data against
   the config and the model (``megasyne.training.run_plan.plan_run``: vocabulary, context
   length, steps that fit the recipe, stage names);
2. builds each pipeline stage's model on the meta device under a fake process group of the real
   world size, as that stage's ranks would (the layout checks of ``ParallelDims``, Megatron's
   own set-up), and measures its memory (``megasyne.planning.memory``) against the card's;
3. derives the schedule: steps and tokens per stage and per source, where each stage starts and
   ends, the LR of every step (the trainer's function), checkpoint cadence and size, and the
   time to finish at a stated MFU.

The result is a JSON-able dict; ``megasyne.planning.report`` prints it and plots the LR curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megasyne.errors import ConfigError

# Usable memory (GiB, as torch reports the card's total) and dense bf16 peak of the cards we plan for.
CARDS = {
    "H100": {"memory_gib": 79.1, "bf16_flops": 989e12},
    "H200": {"memory_gib": 139.8, "bf16_flops": 989e12},
    "A100": {"memory_gib": 79.1, "bf16_flops": 312e12},
}


@dataclass(kw_only=True, frozen=True)
class PlanOptions:
    card: str = "H100"
    """GPU type the run is planned for (memory and peak FLOP/s): one of CARDS."""
    mfu: float = 0.40
    """Model FLOPs utilisation assumed for the time estimate (BENCHMARKS.md has measured ones)."""
    work_dir: str
    """Scratch directory for stand-in datasets and the index (sparse files, ~1 GB of .idx
    for a 100B-token recipe)."""
    doc_tokens: int = 2048
    """Mean document length of stand-in datasets."""

    def __post_init__(self):
        if self.card not in CARDS:
            raise ConfigError(f"card must be one of {sorted(CARDS)}, got {self.card!r}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu must be in (0, 1], got {self.mfu}")


def plan(cfg, options: PlanOptions, *, absent_init_checkpoint: str | None = None) -> dict:
    """The plan of run ``cfg`` (a validated TrainConfig at its real world size);
    ``absent_init_checkpoint``: the config's init_checkpoint, not on this machine (left out of
    ``cfg`` by ``load_plan_config``), whose model the run checks when it starts."""
    model_cfg = cfg.model_config()
    notes: list[str] = []
    dataset, standins = _build_index(cfg.recipe, Path(options.work_dir) / "train",
                                     vocab_size=model_cfg.vocab_size, doc_tokens=options.doc_tokens)
    from megasyne.training.run_plan import plan_run

    run = plan_run(cfg, dataset, model_cfg)
    if cfg.eval_recipe:
        eval_set, _ = _build_index(cfg.eval_recipe, Path(options.work_dir) / "eval",
                                   vocab_size=model_cfg.vocab_size, doc_tokens=options.doc_tokens)
        _check_hooks(cfg, dataset, eval_set, Path(options.work_dir), notes)
    if absent_init_checkpoint:
        notes.append(f"init_checkpoint {absent_init_checkpoint} is not on this machine: its "
                     f"model is checked against the config when the run starts")
    else:
        notes += _check_init_checkpoint(cfg, model_cfg)
    card = CARDS[options.card]
    memory = _memory(cfg, model_cfg, dataset.seq_length)
    return {
        "config": {"recipe": cfg.recipe, "model": model_cfg.name,
                                  "layout": cfg.parallel.layout_dict(),
                                  "world_size": cfg.parallel.world_size,
                                  "micro_batch_size": cfg.micro_batch_size,
                                  "global_batch_size": cfg.global_batch_size,
                                  "num_microbatches": cfg.num_microbatches(cfg.parallel.dp),
                                  "dtype": cfg.dtype, "recompute": cfg.recompute},
        "data": {"seq_length": dataset.seq_length, "samples": len(dataset),
                 "stand_ins": {p: {"docs": r["docs"], "tokens": r["tokens"]}
                               for p, r in standins.items()}},
        "steps": _steps(cfg, run, dataset),
        "lr": [run.lr_at(s, cfg)[0] for s in range(run.run_steps)],
        "memory": {"card": options.card, "card_memory_gib": card["memory_gib"],
                   "stages": [m.to_dict() for m in memory],
                   "peak_gib": max(m.total for m in memory) / (1 << 30),
                   "fits": max(m.total for m in memory) / (1 << 30) <= card["memory_gib"]},
        "checkpoints": _checkpoints(cfg, run, memory),
        "time": _time(cfg, run, model_cfg, dataset.seq_length, card, options.mfu),
        "notes": notes,
    }


def _build_index(recipe_path: str, work: Path, *, vocab_size: int, doc_tokens: int):
    from megasyne.data.dataset import MixtureDataset
    from megasyne.data.mixture import build_or_load_index
    from megasyne.data.recipe import load_recipe
    from megasyne.planning.standins import with_standins

    recipe, standins = with_standins(load_recipe(recipe_path), work / "data",
                                     vocab_size=vocab_size, doc_tokens=doc_tokens)
    built = build_or_load_index(recipe, work / "index")
    return MixtureDataset(built.path), standins


def _steps(cfg, run, dataset) -> dict:
    """Per stage: its steps, samples and tokens, and per source within it."""
    G, seq = cfg.global_batch_size, dataset.seq_length
    names = list(dataset.source_names)
    stages = {}
    for name, (a, b) in run.stage_ranges.items():
        ids = np.asarray(dataset.source_id[a * G:b * G], dtype=np.int64)
        counts = np.bincount(ids, minlength=len(names))
        stages[name] = {"first_step": a, "end_step": b, "steps": b - a,
                        "in_this_launch": a < run.total_steps,
                        "samples": int(len(ids)), "tokens": int(len(ids)) * seq,
                        "sources": {n: {"samples": int(c), "tokens": int(c) * seq,
                                        "share": float(c) / max(len(ids), 1)}
                                    for n, c in zip(names, counts) if c}}
    return {"run_steps": run.run_steps, "launch_steps": run.total_steps,
            "unused_samples": len(dataset) - run.run_steps * G, "stages": stages}


def _memory(cfg, model_cfg, seq_length: int) -> list:
    """Each pipeline stage's memory, its model built on the meta device as its ranks build it."""
    from megasyne.megatron_patches.cpu_shims import cuda_maps_to
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.parallel.init import destroy_parallel, init_rehearsal
    from megasyne.planning.memory import stage_memory

    dims = cfg.parallel
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    # The GPU's paths: SDPA (flash) attention; torch's ops for the trace (see memory.py).
    runtime = ModelRuntime(dtype=dtype, init_weights=False, triton_kernels=False,
                           recompute=cfg.recompute, attention="sdpa", use_te=False,
                           wgrad_fusion=False)
    out = []
    try:
        for stage in range(dims.pp):
            # Megatron's rank order puts TP fastest, then CP, DP, PP: the first rank of a stage.
            init_rehearsal(dims, rank=stage * dims.tp * dims.cp * dims.dp, seed=cfg.seed)
            with cuda_maps_to("meta"):
                with torch.device("meta"):  # the build only: Megatron's forward makes host tensors
                    chunks = build_model(model_cfg, dims, runtime)
                out.append(stage_memory(stage, chunks, dims=dims, dtype=dtype,
                                        micro_batch_size=cfg.micro_batch_size,
                                        seq_length=seq_length, hidden_size=model_cfg.hidden_size,
                                        num_microbatches=cfg.num_microbatches(dims.dp)))
    finally:
        destroy_parallel()
    return out


def _checkpoints(cfg, run, memory) -> dict:
    """Size of one checkpoint (weights + fp32 optimizer state of every parameter, all ranks)
    and how many the run writes and keeps."""
    params = sum(m.parameters for m in memory) * cfg.parallel.tp  # stages x TP shards
    weight_bytes = 2 if cfg.dtype == "bf16" else 4
    size = params * (weight_bytes + (12 if cfg.dtype == "bf16" else 8))
    saves = run.total_steps // cfg.save_interval if cfg.save_interval else 0
    return {"parameters": params, "size_gib": size / (1 << 30), "save_interval": cfg.save_interval,
            "saves_in_launch": saves + 1, "keep_last": cfg.keep_last,
            "disk_gib": size * (cfg.keep_last + 1) / (1 << 30)}


def _time(cfg, run, model_cfg, seq_length: int, card: dict, mfu: float) -> dict:
    tokens_per_step = cfg.global_batch_size * seq_length
    flops_per_step = model_cfg.flops_per_token(seq_length) * tokens_per_step
    step_s = flops_per_step / (cfg.parallel.world_size * card["bf16_flops"] * mfu)
    return {"mfu": mfu, "tokens_per_step": tokens_per_step, "step_s": step_s,
            "tokens_per_s": tokens_per_step / step_s, "run_hours": run.run_steps * step_s / 3600,
            "launch_hours": run.total_steps * step_s / 3600,
            "save_every_min": (cfg.save_interval or 0) * step_s / 60}


def _check_hooks(cfg, dataset, eval_set, work: Path, notes: list[str]) -> None:
    """The periodic features' own start-up checks, on the planned data."""
    if cfg.adaptive is not None:
        from megasyne.training.hooks.adaptive_mixture import AdaptiveMixtureHook

        try:
            AdaptiveMixtureHook(cfg.adaptive, dataset, eval_set.source_names, work,
                                global_batch_size=cfg.global_batch_size, is_writer=False)
        except ValueError as exc:
            raise ConfigError(f"adaptive: {exc}") from None
    if cfg.bench_eval is not None:
        notes.append("bench_eval: its task files and tokenizer are checked at the run's start")


def _check_init_checkpoint(cfg, model_cfg) -> list[str]:
    if not cfg.init_checkpoint:
        return ["no init_checkpoint: the run starts from random weights"]
    from megasyne.checkpoint.dist import check_model_compatible, read_manifest

    check_model_compatible(read_manifest(cfg.init_checkpoint), model_cfg.to_dict(),
                           cfg.init_checkpoint)
    return []
