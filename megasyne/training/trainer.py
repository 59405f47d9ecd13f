"""The continual pre-training loop: mixture index -> micro-batches -> Megatron step -> logs/checkpoints.

A :class:`Trainer` is built from a validated ``TrainConfig``: ``__init__`` creates the process
groups of the layout, the data (the recipe's mixture index), the model chunks and the optimizer,
the metrics log and the hooks (periodic features: validation, the adaptive topic mixture, the
benchmark probe; ``megasyne.training.hooks``). ``train()`` resumes or starts, then loops: set
the LR, one optimizer step, log, run the hooks that are due, save when due. The next steps'
micro-batches are read on a background thread meanwhile (``data_prefetch``;
``megasyne.training.prefetch``); a step's logged time is its wall time, its wait for data
included (also logged alone, ``data_wait_ms``).

Resume restores model, optimizer, the step (hence the LR schedule) and the data cursor
(consumed samples = step x global batch, because sample i is a pure function of i), each hook's
state, plus each rank's RNG state when the layout is unchanged. SIGTERM (cluster preemption)
makes the loop save at the end of the current step and exit 0.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megasyne.atomic import atomic_write_json
from megasyne.checkpoint import dist as ckpt
from megasyne.checkpoint.async_save import AsyncCheckpointer
from megasyne.errors import TrainingError
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.parallel.init import comm_device, init_parallel, launcher_world
from megasyne.training import metrics as M
from megasyne.training.batches import batch_crc, build_index_on_rank0, micro_batches, pinned
from megasyne.training.config import ConfigError, TrainConfig, dump_config
from megasyne.training.data_state import RunData
from megasyne.training.documents import eod_token_id
from megasyne.training.hooks import HookContext, build_hooks
from megasyne.training.hooks.validation import Validator
from megasyne.training.optim import build_optimizer, wrap_ddp
from megasyne.training.prefetch import BatchPrefetcher, StepData
from megasyne.training.run_lock import RunDirLock
from megasyne.training.run_plan import plan_run
from megasyne.training.step import StepResult, gpt_forward_step, train_step

print0 = M.print0
COMPLETE_MARKER = "complete.json"
"""In run_dir once a launch has trained to the end of its plan (and saved); removed when a
launch starts."""


class TrainingAborted(TrainingError, RuntimeError):
    """Too many consecutive non-finite steps, or another unrecoverable condition."""


class Preemption:
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


class Trainer:
    """One training run (see the module docstring); every rank builds one."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dims = cfg.parallel
        self.rank = launcher_world()[0]
        self.run_dir = Path(cfg.run_dir)
        self.model_cfg = cfg.model_config()
        # Rank 0 holds the run directory for the whole run (a second launcher fails here).
        self.lock = RunDirLock(self.run_dir).acquire() if self.rank == 0 else None
        try:
            self._build(cfg)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self, cfg: TrainConfig) -> None:
        init_parallel(self.dims, seed=cfg.seed)
        if self.rank == 0:
            dump_config(cfg, self.run_dir / "config.yaml")
        dist.barrier()
        self._build_data()
        runtime = ModelRuntime(dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
                               triton_kernels=cfg.triton_kernels, recompute=cfg.recompute)
        self.chunks = wrap_ddp(build_model(self.model_cfg, self.dims, runtime), self.dims)
        self.optimizer = build_optimizer(self.chunks, self.dims, cfg.optim)
        self.log = M.MetricsLog(self.run_dir, is_writer=self.rank == 0,
                                tensorboard=cfg.tensorboard)
        self.validator = None
        if cfg.eval_recipe:
            eval_set = build_index_on_rank0(cfg.eval_recipe, self.run_dir / "eval_index")
            self.validator = Validator(
                eval_set, samples=cfg.eval_samples, micro_batch_size=cfg.micro_batch_size,
                vocab_size=self.model_cfg.vocab_size, masking=cfg.document_masking,
                eod_id=eod_token_id(eval_set, cfg.document_masking,
                                    f"eval_recipe {cfg.eval_recipe}"))
        self.hooks = build_hooks(self)
        self.async_saver = AsyncCheckpointer(log=print0) if cfg.async_save else None
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.last_loss = float("nan")
        # Bumped when a hook changes the samples ahead: reads ahead of an older version are redone.
        self.data_version = 0
        self._batches: BatchPrefetcher | None = None

    # ------------------------------------------------------------------ set-up
    def _build_data(self) -> None:
        """The recipe's index, and the steps and stages of this run, checked against the model."""
        cfg = self.cfg
        self.dataset = build_index_on_rank0(cfg.recipe, self.run_dir / "index", keep_stale=True)
        self.run_data = RunData(self.dataset, rebase_allowed=cfg.rebase_data,
                                adaptive=cfg.adaptive is not None)
        self.seq_length = self.dataset.seq_length
        self.plan = plan_run(cfg, self.dataset, self.model_cfg)
        self.sources = list(self.dataset.source_names)
        # For each step's metrics: fixed for the run, so looked up once.
        self.flops_per_token = self.model_cfg.flops_per_token(self.seq_length)
        self.peak_flops = M.peak_flops_per_device()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint records besides model and optimizer (its manifest's ``extra``)."""
        state = dict(consumed_samples=self.step * self.cfg.global_batch_size,
                     global_batch_size=self.cfg.global_batch_size,
                     layout=self.dims.layout_dict(), skipped_steps=self.skipped_steps,
                     recipe=self.cfg.recipe,
                     data=self.run_data.state_dict(self.step * self.cfg.global_batch_size))
        for hook in self.hooks:
            hook_state = hook.state_dict()
            if hook_state is not None:
                state[hook.key] = hook_state
        return state

    def check_resumable(self, state: dict, *, checkpoint: str) -> None:
        """Before loading a checkpoint: refuse what cannot continue this run exactly."""
        if state.get("global_batch_size") != self.cfg.global_batch_size:
            raise ConfigError(f"{checkpoint}: saved with global_batch_size "
                              f"{state.get('global_batch_size')}, this run uses "
                              f"{self.cfg.global_batch_size}; resume with the same value")
        saved_dist_opt = state.get("layout", {}).get("distributed_optimizer", False)
        if saved_dist_opt != self.dims.distributed_optimizer:
            raise ConfigError(f"{checkpoint} was saved with parallel.distributed_optimizer="
                              f"{saved_dist_opt} and Megatron cannot load it into the other "
                              f"optimizer kind: resume with the same setting")
        consumed = int(state.get("consumed_samples", 0))
        self.run_data.check(state.get("data"), consumed, checkpoint=checkpoint)

    def load_state_dict(self, state: dict, *, checkpoint: str) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        for hook in self.hooks:
            hook.load_state_dict(state.get(hook.key), checkpoint=checkpoint)
        self.run_data.verify(state.get("data"), self.step * self.cfg.global_batch_size,
                             checkpoint=checkpoint)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of the run, if any (else start: from
        init_checkpoint's weights when given)."""
        cfg = self.cfg
        self.finish_pending_save()  # a checkpoint in flight is published before any load
        if cfg.fresh_start:
            self._set_aside_previous_run()
        path = self._intact_checkpoint()
        if path is None:
            self.log.truncate_after(-1)  # a fresh start: drop lines of a run killed before its first save
            if cfg.init_checkpoint:
                ckpt.load_checkpoint(cfg.init_checkpoint, self.chunks,
                                     model_config=self.model_cfg.to_dict())
                # bf16: the optimizer's fp32 master copies were made from the random init
                # when it was built; without this the first update writes them back.
                self.optimizer.reload_model_params()
                print0(f"initial weights from {cfg.init_checkpoint}")
            return False
        self.check_resumable(ckpt.read_manifest(path)["extra"], checkpoint=str(path))
        manifest = ckpt.load_checkpoint(path, self.chunks, optimizer=self.optimizer,
                                        model_config=self.model_cfg.to_dict(), verify=False)
        self.step = manifest["iteration"]
        self.load_state_dict(manifest["extra"], checkpoint=str(path))
        rng_file = _rng_path(path, self.rank)
        if manifest["extra"].get("layout") == self.dims.layout_dict() and rng_file.exists():
            torch.set_rng_state(torch.load(rng_file))
        self.log.truncate_after(self.step)
        print0(f"resumed from {path} at step {self.step} "
               f"(consumed samples {self.step * cfg.global_batch_size})")
        return True

    def _intact_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: the newest intact one that ``latest`` allows, a
        damaged one skipped with a warning; None when the run has none (a fresh start). Refuses
        when every checkpoint is damaged: work exists, so no silent fresh start."""
        root = self.run_dir / "checkpoints"
        damaged = []
        for path in ckpt.resume_candidates(root, warn=print0):
            try:
                ckpt.verify_checkpoint(path)
                return path
            except ckpt.CheckpointCorruptError as exc:
                damaged.append(str(exc))
                print0(f"warning: {exc}; falling back to the previous checkpoint")
        if damaged:
            raise ckpt.CheckpointError(
                f"no intact checkpoint in {root} ({' | '.join(damaged)}): restore them, or "
                f"rerun with --set fresh_start=true to set them aside and start from step 0")
        return None

    def _set_aside_previous_run(self) -> None:
        """fresh_start: the run's checkpoints and metrics renamed aside, nothing deleted."""
        if self.rank == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in ("checkpoints", "metrics.jsonl"):
                old = self.run_dir / name
                if old.exists():
                    aside = self.run_dir / f"{name}.set-aside-{stamp}"
                    old.rename(aside)
                    print0(f"fresh_start: {old} moved to {aside}")
        dist.barrier()

    def save(self) -> Path | None:
        """Checkpoint this step; returns its directory, or None when it is being written in
        the background (async_save: published later by finish_pending_save or the loop's
        per-step poll)."""
        root = self.run_dir / "checkpoints"
        what = dict(model_config=self.model_cfg.to_dict(), layout=self.dims.layout_dict(),
                    optimizer=self.optimizer, extra=self.state_dict(),
                    keep_last=self.cfg.keep_last, before_publish=partial(_save_rng, rank=self.rank))
        if self.async_saver is None:
            path = ckpt.save_checkpoint(root, self.step, self.chunks, **what)
            print0(f"saved checkpoint {path}")
            return path
        blocked = self.async_saver.start(root, self.step, self.chunks, **what,
                                         slow_write=self.step in self.cfg.fault_slow_async_write)
        print0(f"checkpoint of step {self.step}: writing in the background (training blocked "
               f"{blocked:.2f} s)")
        return None

    def finish_pending_save(self) -> Path | None:
        """Collective: wait for the checkpoint being written in the background, publish it."""
        return self.async_saver.wait() if self.async_saver is not None else None

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run (or resume) training to the end of the run (or a stop); returns a summary."""
        cfg = self.cfg
        complete = self.run_dir / COMPLETE_MARKER
        if self.rank == 0:  # a marker of an earlier launch says nothing of this one's end
            complete.unlink(missing_ok=True)
        if not self.resume():
            start = self.run_hooks(0, {"step": 0})  # before the first update: curves' origin
            if len(start) > 1:
                self.log.write(start)
        preempt = Preemption()
        try:
            self._loop(preempt)
        except TrainingAborted:
            self.finish_pending_save()  # every rank stops at the same step: collectives are safe
            raise
        except BaseException:
            if self.async_saver is not None:
                self.async_saver.abort()  # maybe this rank alone failed: no collective
            raise
        self.close_data()
        self.finish_pending_save()
        if self.step == self.plan.total_steps and cfg.stop_after_stage:
            print0(f"stage {cfg.stop_after_stage} done at step {self.step}; rerun without "
                   f"stop_after_stage (same run_dir) to continue into the next stage")
        self.log.close()
        if self.step == self.plan.total_steps and self.rank == 0:
            # Written after the last checkpoint: a launch that exits 0 without it was stopped
            # (SIGTERM, exit_at_step), which is what drivers of many runs (tools/ablate.py) check.
            atomic_write_json(complete, {"step": self.step, "checkpoint": str(self.run_dir / "checkpoints"),
                                         "stop_after_stage": cfg.stop_after_stage})
        return dict(step=self.step, loss=self.last_loss, skipped_steps=self.skipped_steps)

    def _loop(self, preempt: Preemption) -> None:
        """Steps to the end of the run or a stop; saves when due."""
        cfg = self.cfg
        while self.step < self.plan.total_steps:
            record = self.train_one_step()
            self.run_hooks(self.step, record)
            self.log.write(record)
            if self.step % cfg.log_interval == 0 or self.step == self.plan.total_steps:
                print0(M.console_line(record))
            if self.async_saver is not None:
                self.async_saver.poll()  # publishes a finished background write
            stop = preempt.agreed() or self.step == cfg.exit_at_step
            if (cfg.save_interval and self.step % cfg.save_interval == 0) \
                    or self.step == self.plan.total_steps or stop:
                self.save()
            if stop:
                self.finish_pending_save()
                why = "exit_at_step reached" if self.step == cfg.exit_at_step else "SIGTERM received"
                print0(f"{why}: checkpointed at step {self.step}, exiting")
                break

    def train_one_step(self) -> dict:
        """One optimizer step on the next global batch; returns its metrics record.

        Its time is the step's wall time from asking for the data to the optimizer's update:
        a wait for data (a read ahead not done yet, or the whole read with data_prefetch 0)
        counts, and is also logged alone as data_wait_ms."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr, stage = self.plan.lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self._batches is None:  # first step of this launch: reads start at the resumed step
            self._batches = self._prefetcher()
        data, _ = self._batches.get(self.step, self.data_version)
        # The reduce waits for the slowest DP rank's data: part of the wait too.
        data_crc = _data_fingerprint(data.crc)
        data_wait = time.perf_counter() - t0
        batch = data.batch
        iters = [iter(batch) for _ in self.chunks] if len(self.chunks) > 1 else iter(batch)
        forward = partial(gpt_forward_step, num_sources=len(self.sources),
                          inject_nan=(self.step + 1) in cfg.fault_nan_steps)
        result = train_step(self.chunks, self.optimizer, iters,
                            num_microbatches=cfg.num_microbatches(self.dims.dp),
                            micro_batch_size=cfg.micro_batch_size, seq_length=self.seq_length,
                            num_sources=len(self.sources), forward_step_func=forward,
                            documents=cfg.document_masking.enabled)
        if cfg.fault_step_delay_s:
            time.sleep(cfg.fault_step_delay_s)
        elapsed = time.perf_counter() - t0
        self.step += 1
        self._count_nonfinite(result)
        return self._record(result, lr=lr, stage=stage, elapsed=elapsed, data_crc=data_crc,
                            data_wait=data_wait)

    def _prefetcher(self) -> BatchPrefetcher:
        """Reads of this rank's steps, ``data_prefetch`` ahead, none past where the run stops."""
        from megatron.core import parallel_state as ps

        cfg, G = self.cfg, self.cfg.global_batch_size
        end = min(self.plan.total_steps, cfg.exit_at_step or self.plan.total_steps)
        return BatchPrefetcher(
            partial(self._read_step, dp_rank=ps.get_data_parallel_rank()),
            depth=cfg.data_prefetch, end_step=end,
            describe=lambda s: f"[{s * G}, {(s + 1) * G}) of {self.dataset.index_dir}")

    def _read_step(self, step: int, *, dp_rank: int) -> StepData:
        """Step ``step``'s micro-batches of this DP rank (on the prefetch thread when on)."""
        cfg = self.cfg
        if cfg.fault_data_read_delay_s:
            time.sleep(cfg.fault_data_read_delay_s)
        batch = micro_batches(self.dataset, first_sample=step * cfg.global_batch_size,
                              per_rank=cfg.global_batch_size // self.dims.dp, dp_rank=dp_rank,
                              micro_batch_size=cfg.micro_batch_size,
                              masking=cfg.document_masking, eod_id=self.plan.eod_id)
        if torch.cuda.is_available() and cfg.data_prefetch:
            batch = pinned(batch)  # here, off the step's path (the upload then skips it)
        return StepData(step=step, batch=batch, crc=batch_crc(batch))

    def close_data(self) -> None:
        """Stop the prefetch thread: reads not started are cancelled, the one in flight is
        waited for (``train()`` calls this also when the loop raises)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def run_hooks(self, step: int, record: dict) -> dict:
        """Run the hooks due after ``step`` steps; their results go into ``record``."""
        ctx = HookContext(self, record)
        for hook in self.hooks:
            if hook.due(step):
                result = hook.run(step, ctx)
                if hook.changes_data:  # batches read ahead may hold the old samples
                    self.data_version += 1
                if result is not None:
                    record[hook.key] = result
        return record

    def _count_nonfinite(self, result: StepResult) -> None:
        if not result.skipped:
            self.nonfinite_in_a_row = 0
            self.last_loss = result.loss
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_in_a_row:
            raise TrainingAborted(
                f"{self.nonfinite_in_a_row} consecutive steps with a non-finite loss (last at "
                f"step {self.step}); aborting. Lower the LR, check the data around sample "
                f"{(self.step - 1) * self.cfg.global_batch_size}, or resume from the last "
                f"checkpoint")

    def _record(self, result: StepResult, *, lr: float, stage: str, elapsed: float,
                data_crc: int, data_wait: float) -> dict:
        """``elapsed``: the step's wall time (data wait included), which tokens/s and MFU use."""
        G, world = self.cfg.global_batch_size, self.dims.world_size
        tokens = G * self.seq_length
        tok_s = tokens / elapsed
        tflops = self.flops_per_token * tok_s / world / 1e12
        peak = self.peak_flops
        return dict(
            step=self.step, stage=stage, consumed_samples=self.step * G,
            consumed_tokens=self.step * tokens, loss=result.loss, lr=lr,
            grad_norm=result.grad_norm, skipped=result.skipped, skipped_steps=self.skipped_steps,
            tokens_per_s=tok_s, tflops_per_device=tflops,
            mfu=(tflops * 1e12 / peak) if peak else None, step_time_s=elapsed,
            data_wait_ms=1e3 * data_wait,
            source_loss={s: result.source_loss_sum[i] / result.source_tokens[i]
                         for i, s in enumerate(self.sources) if result.source_tokens[i] > 0},
            source_tokens={s: int(result.source_tokens[i]) for i, s in enumerate(self.sources)},
            data_crc=data_crc,
        )


def train(cfg: TrainConfig) -> dict:
    """Build the trainer of ``cfg`` and run it; returns its summary."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close_data()  # after an error too: no reader thread left at exit
        if trainer.lock is not None:
            trainer.lock.release()


def _data_fingerprint(crc: int) -> int:
    """This rank's CRC32 of the step's tokens (``batch_crc``), summed over the data-parallel
    group.

    Logged per step so a resumed run can be checked to read exactly the samples, in the
    same order, that an uninterrupted run reads (for the same DP size).
    """
    from megatron.core import parallel_state as ps

    total = torch.tensor([crc], dtype=torch.int64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return int(total.item())


def _rng_path(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / "rng" / f"rank{rank:05d}.pt"


def _save_rng(ckpt_tmp_dir: Path, *, rank: int) -> None:
    path = _rng_path(ckpt_tmp_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.get_rng_state(), path)


__all__ = ["Trainer", "TrainingAborted", "train"]
