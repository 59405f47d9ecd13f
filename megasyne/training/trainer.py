"""The continual pre-training loop: mixture index -> micro-batches -> Megatron step -> logs/checkpoints.

Resume restores model, optimizer, the step (hence the LR schedule) and the data cursor
(consumed samples = step x global batch, because sample i is a pure function of i), plus
each rank's RNG state when the layout is unchanged. SIGTERM (cluster preemption) makes
the loop save at the end of the current step and exit 0.
"""

from __future__ import annotations

import math
import signal
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megasyne.checkpoint import dist as ckpt
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import comm_device, init_parallel, launcher_world
from megasyne.training import metrics as M
from megasyne.training.config import ConfigError, TrainConfig, dump_config
from megasyne.training.batches import build_index_on_rank0, check_vocabulary, micro_batches
from megasyne.training.optim import build_optimizer, wrap_ddp
from megasyne.training.schedule import lr_at, stage_step_ranges
from megasyne.training.step import gpt_forward_step, reduce_losses, run_microbatches, train_step


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps, or another unrecoverable condition."""


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint before exiting."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """All ranks must stop at the same step: any rank's signal stops everyone."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _rng_path(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / "rng" / f"rank{rank:05d}.pt"


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary dict."""
    rank, _, world = launcher_world()
    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, pp=p.pp, virtual_pp=p.virtual_pp, world_size=world,
                        sequence_parallel=p.sequence_parallel,
                        distributed_optimizer=p.distributed_optimizer)
    model_cfg = cfg.model_config()
    dims.validate_for_model(num_layers=model_cfg.num_layers,
                            num_attention_heads=model_cfg.num_attention_heads,
                            num_query_groups=model_cfg.num_query_groups,
                            ffn_hidden_size=model_cfg.ffn_hidden_size,
                            micro_batches=cfg.num_microbatches(dims.dp))
    num_mb = cfg.num_microbatches(dims.dp)
    run_dir = Path(cfg.run_dir)
    init_parallel(dims, seed=cfg.seed)
    from megatron.core import parallel_state as ps

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    dist.barrier()

    dataset = build_index_on_rank0(cfg.recipe, run_dir / "index")
    seq_length = dataset.seq_length
    try:
        check_vocabulary(dataset, model_cfg.vocab_size, f"recipe {cfg.recipe}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"recipe seq_length {seq_length} exceeds the model's "
                         f"max_position_embeddings {model_cfg.max_position_embeddings}")
    total_steps = cfg.train_steps or len(dataset) // cfg.global_batch_size
    if total_steps * cfg.global_batch_size > len(dataset):
        raise ConfigError(f"train_steps {total_steps} x global_batch_size {cfg.global_batch_size} "
                         f"needs {total_steps * cfg.global_batch_size} samples but the recipe "
                         f"{cfg.recipe} provides {len(dataset)}")
    sources = list(dataset.source_names)
    stage_ranges = stage_step_ranges(dataset.stage_boundaries, dataset.stage_names,
                                     cfg.global_batch_size, total_steps)
    _check_stage_names(cfg, stage_ranges)
    if cfg.stop_after_stage:
        total_steps = stage_ranges[cfg.stop_after_stage][1]
    eval_set = build_index_on_rank0(cfg.eval_recipe, run_dir / "eval_index") \
        if cfg.eval_recipe else None
    adaptive = None
    if cfg.adaptive is not None:
        from megasyne.training.adaptive import AdaptiveController

        try:
            adaptive = AdaptiveController(cfg.adaptive, dataset, eval_set.source_names, run_dir,
                                          global_batch_size=cfg.global_batch_size,
                                          is_writer=rank == 0,
                                          fault_growth=cfg.fault_topic_ppl_growth)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    runtime = ModelRuntime(dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
                           triton_kernels=cfg.triton_kernels, recompute=cfg.recompute)
    chunks = build_model(model_cfg, dims, runtime)
    ddp = wrap_ddp(chunks, dims)
    optimizer = build_optimizer(ddp, dims, cfg.optim)
    log = M.MetricsLog(run_dir, is_writer=rank == 0, tensorboard=cfg.tensorboard)
    bench = None
    if cfg.bench_eval is not None:
        from megasyne.training.bench_eval import BenchEval

        try:
            bench = BenchEval(cfg.bench_eval, model_cfg.vocab_size)
        except Exception as exc:  # bad task file, missing benchmark file, bad tokenizer
            raise ConfigError(f"bench_eval: {exc}") from None

    step = 0
    resume = ckpt.find_latest(run_dir / "checkpoints")
    if resume is not None:
        saved_layout = ckpt.read_manifest(resume)["extra"].get("layout", {})
        if saved_layout.get("distributed_optimizer", False) != dims.distributed_optimizer:
            raise ValueError(
                f"{resume} was saved with parallel.distributed_optimizer="
                f"{saved_layout.get('distributed_optimizer')} and Megatron cannot load it into "
                f"the other optimizer kind: resume with the same setting")
        manifest = ckpt.load_checkpoint(resume, ddp, optimizer=optimizer,
                                        model_config=model_cfg.to_dict())
        step = manifest["iteration"]
        extra = manifest["extra"]
        if extra.get("global_batch_size") != cfg.global_batch_size:
            raise ValueError(f"{resume}: saved with global_batch_size "
                             f"{extra.get('global_batch_size')}, run uses {cfg.global_batch_size}")
        rng_file = _rng_path(resume, rank)
        if extra.get("layout") == _layout(dims) and rng_file.exists():
            torch.set_rng_state(torch.load(rng_file))
        log.truncate_after(step)
        if adaptive is not None:
            if "adaptive" not in extra:
                raise ConfigError(f"{resume} was saved without the adaptive mixture; resume it "
                                  f"with the same adaptive settings it was started with")
            adaptive.load_state_dict(extra["adaptive"])
        _print0(f"resumed from {resume} at step {step} "
                f"(consumed samples {step * cfg.global_batch_size})")
    else:
        log.truncate_after(-1)  # a fresh start: drop lines of a run killed before its first save
    if resume is None and cfg.init_checkpoint:
        ckpt.load_checkpoint(cfg.init_checkpoint, ddp, model_config=model_cfg.to_dict())
        _print0(f"initial weights from {cfg.init_checkpoint}")

    preempt = _Preemption()
    per_rank = cfg.global_batch_size // dims.dp
    flops_per_token = model_cfg.flops_per_token(seq_length)
    peak = M.peak_flops_per_device()
    skipped_total, nonfinite_run = 0, 0
    last_loss = float("nan")

    def save(at_step: int):
        extra = dict(consumed_samples=at_step * cfg.global_batch_size,
                     global_batch_size=cfg.global_batch_size, layout=_layout(dims),
                     skipped_steps=skipped_total, recipe=cfg.recipe)
        if adaptive is not None:
            extra["adaptive"] = adaptive.state_dict()
        path = ckpt.save_checkpoint(run_dir / "checkpoints", at_step, ddp,
                                    model_config=model_cfg.to_dict(), layout=_layout(dims),
                                    optimizer=optimizer, extra=extra, keep_last=cfg.keep_last,
                                    before_publish=partial(_save_rng, rank=rank))
        _print0(f"saved checkpoint {path}")

    run_steps = cfg.train_steps or len(dataset) // cfg.global_batch_size  # the whole recipe

    def lr_for(at: int) -> tuple[float, str]:
        name = dataset.stage_names[dataset.stage_of(at * cfg.global_batch_size)]
        st = cfg.stage_settings.get(name)
        if st is not None:
            a, b = stage_ranges[name]
            return lr_at(at - a, peak_lr=st.lr, min_lr=st.min_lr, total_steps=b - a,
                         schedule=st.schedule), name
        # The global schedule spans the whole recipe, also when stop_after_stage ends this
        # run early: a stage-I-only run follows the same curve as the full run would.
        return lr_at(at, peak_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                     total_steps=run_steps, schedule=cfg.schedule), name

    if resume is None and (adaptive is not None or bench is not None):
        start = {"step": 0}  # before the first update: the starting point of the curves
        if bench is not None:
            start["bench"] = bench.run(ddp)
        if adaptive is not None:
            start["eval"] = evaluate(ddp, eval_set, cfg, dims, seq_length)
            start["adaptive"] = adaptive.decide(0, start["eval"])
        log.write(start)

    while step < total_steps:
        lr, stage = lr_for(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = micro_batches(dataset, first_sample=step * cfg.global_batch_size,
                              per_rank=per_rank, dp_rank=ps.get_data_parallel_rank(),
                              micro_batch_size=cfg.micro_batch_size)
        iters = [iter(batch) for _ in ddp] if len(ddp) > 1 else iter(batch)
        data_crc = _data_fingerprint(batch)
        t0 = time.perf_counter()
        result = train_step(ddp, optimizer, iters, num_microbatches=num_mb,
                            micro_batch_size=cfg.micro_batch_size, seq_length=seq_length,
                            num_sources=len(sources),
                            forward_step_func=partial(gpt_forward_step, num_sources=len(sources),
                                                      inject_nan=(step + 1) in cfg.fault_nan_steps))
        elapsed = time.perf_counter() - t0
        step += 1
        if result.skipped:
            skipped_total += 1
            nonfinite_run += 1
            if nonfinite_run >= cfg.max_nonfinite_in_a_row:
                raise TrainingAborted(
                    f"{nonfinite_run} consecutive steps with a non-finite loss (last at step "
                    f"{step}); aborting. Lower the LR, check the data around sample "
                    f"{(step - 1) * cfg.global_batch_size}, or resume from the last checkpoint")
        else:
            nonfinite_run = 0
            last_loss = result.loss
        tokens = cfg.global_batch_size * seq_length
        tok_s = tokens / elapsed
        tflops = flops_per_token * tok_s / world / 1e12
        record = dict(
            step=step, stage=stage, consumed_samples=step * cfg.global_batch_size,
            consumed_tokens=step * tokens, loss=result.loss, lr=lr,
            grad_norm=result.grad_norm, skipped=result.skipped, skipped_steps=skipped_total,
            tokens_per_s=tok_s, tflops_per_device=tflops,
            mfu=(tflops * 1e12 / peak) if peak else None, step_time_s=elapsed,
            source_loss={s: result.source_loss_sum[i] / result.source_tokens[i]
                         for i, s in enumerate(sources) if result.source_tokens[i] > 0},
            source_tokens={s: int(result.source_tokens[i]) for i, s in enumerate(sources)},
            data_crc=data_crc,
        )
        if eval_set is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
            record["eval"] = evaluate(ddp, eval_set, cfg, dims, seq_length)
        if adaptive is not None and adaptive.due(step) and step * cfg.global_batch_size < len(dataset):
            if "eval" not in record:
                record["eval"] = evaluate(ddp, eval_set, cfg, dims, seq_length)
            record["adaptive"] = adaptive.decide(step, record["eval"])
            _print0(f"adaptive mixture at step {step}: " + ", ".join(
                f"{t}={r:.3f}" for t, r in zip(record["adaptive"]["topics"],
                                               record["adaptive"]["new_ratios"])))
        if bench is not None and bench.due(step):
            record["bench"] = bench.run(ddp)
            _print0(f"benchmarks at step {step}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in record["bench"].items()))
        log.write(record)
        if step % cfg.log_interval == 0 or step == total_steps:
            _print0(M.console_line(record))
        stop = preempt.agreed() or step == cfg.exit_at_step
        if (cfg.save_interval and step % cfg.save_interval == 0) or step == total_steps or stop:
            save(step)
        if stop:
            why = "exit_at_step reached" if step == cfg.exit_at_step else "SIGTERM received"
            _print0(f"{why}: checkpointed at step {step}, exiting")
            break
    if step == total_steps and cfg.stop_after_stage:
        _print0(f"stage {cfg.stop_after_stage} done at step {step}; rerun without "
                f"stop_after_stage (same run_dir) to continue into the next stage")
    log.close()
    return dict(step=step, loss=last_loss, skipped_steps=skipped_total)


def evaluate(ddp: list, dataset, cfg: TrainConfig, dims: ParallelDims, seq_length: int) -> dict:
    """Forward-only loss and perplexity per source on the first eval_samples held-out samples."""
    from megatron.core import parallel_state as ps

    sources = list(dataset.source_names)
    n = min(cfg.eval_samples, len(dataset)) // (dims.dp * cfg.micro_batch_size) \
        * dims.dp * cfg.micro_batch_size
    if n == 0:
        return {}
    per_rank = n // dims.dp
    batch = micro_batches(dataset, first_sample=0, per_rank=per_rank,
                          dp_rank=ps.get_data_parallel_rank(), micro_batch_size=cfg.micro_batch_size)
    iters = [iter(batch) for _ in ddp] if len(ddp) > 1 else iter(batch)
    for c in ddp:
        c.eval()
    with torch.no_grad():
        parts = run_microbatches(ddp, iters, num_microbatches=len(batch),
                                 micro_batch_size=cfg.micro_batch_size, seq_length=seq_length,
                                 forward_only=True,
                                 forward_step_func=partial(gpt_forward_step, num_sources=len(sources)))
    for c in ddp:
        c.train()
    loss, sums, toks = reduce_losses(parts, len(sources))
    out = {"loss": loss, "ppl": math.exp(min(loss, 50))}
    for i, s in enumerate(sources):
        if toks[i] > 0:
            out[f"{s}/loss"] = sums[i] / toks[i]
            out[f"{s}/ppl"] = math.exp(min(sums[i] / toks[i], 50))
    return out


def _check_stage_names(cfg: TrainConfig, stage_ranges: dict) -> None:
    named = [("stop_after_stage", cfg.stop_after_stage)] if cfg.stop_after_stage else []
    named += [(f"stage_settings.{n}", n) for n in cfg.stage_settings]
    for key, name in named:
        if name not in stage_ranges:
            raise ConfigError(f"{key}: the recipe {cfg.recipe} has no stage {name!r}; "
                             f"its stages are {list(stage_ranges)}")


def _data_fingerprint(batch: list[dict]) -> int:
    """CRC32 of this step's tokens, summed over the data-parallel group.

    Logged per step so a resumed run can be checked to read exactly the samples, in the
    same order, that an uninterrupted run reads (for the same DP size).
    """
    import zlib

    from megatron.core import parallel_state as ps

    crc = 0
    for mb in batch:
        crc = zlib.crc32(mb["tokens"].numpy().tobytes(), crc)
        crc = zlib.crc32(mb["labels"][:, -1:].numpy().tobytes(), crc)
    total = torch.tensor([crc], dtype=torch.int64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return int(total.item())


def _save_rng(ckpt_tmp_dir: Path, *, rank: int) -> None:
    path = _rng_path(ckpt_tmp_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.get_rng_state(), path)


def _layout(dims: ParallelDims) -> dict:
    return dict(tp=dims.tp, pp=dims.pp, dp=dims.dp, virtual_pp=dims.virtual_pp,
                sequence_parallel=dims.sequence_parallel,
                distributed_optimizer=dims.distributed_optimizer)


def _print0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
