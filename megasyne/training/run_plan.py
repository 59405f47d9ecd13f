"""What a run will do, step by step, from its config and its mixture index: how many optimizer
steps, which recipe stage drives each step, where the run stops, and the learning rate of every
step. One implementation for the trainer and for the dry run (megasyne.planning), so the plan a
user reads before renting GPUs is the run they get.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from megasyne.errors import ConfigError
from megasyne.training.schedule import lr_at, stage_step_ranges


@dataclass(kw_only=True, frozen=True)
class RunPlan:
    run_steps: int
    """Steps of the whole run (train_steps, or as many as the recipe's samples fill); the LR
    schedule spans them, also when stop_after_stage ends this launch earlier."""
    total_steps: int
    """Steps this launch trains to (run_steps, or the end of stop_after_stage's stage)."""
    global_batch_size: int
    stage_names: tuple[str, ...]
    stage_boundaries: tuple[int, ...]
    """Global sample where each recipe stage starts, and the end of the last."""
    stage_ranges: dict
    """Recipe stage -> [first step, end step) of the steps it drives."""
    eod_id: int | None = None
    """The data's end-of-document token when document masking is on (from the preprocess
    reports), else None."""

    def stage_at(self, step: int) -> str:
        """The recipe stage of optimizer step ``step`` (0-based): that of its first sample."""
        k = bisect.bisect_right(self.stage_boundaries, step * self.global_batch_size) - 1
        return self.stage_names[min(k, len(self.stage_names) - 1)]

    def lr_at(self, step: int, cfg) -> tuple[float, str]:
        """(LR, stage name) of step ``step``: the stage's own schedule where the config's
        stage_settings name it, else the run's schedule over the whole recipe."""
        name = self.stage_at(step)
        st = cfg.stage_settings.get(name)
        if st is not None:
            a, b = self.stage_ranges[name]
            return lr_at(step - a, peak_lr=st.lr, min_lr=st.min_lr, total_steps=b - a,
                         schedule=st.schedule), name
        return lr_at(step, peak_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                     total_steps=self.run_steps, schedule=cfg.schedule), name


def plan_run(cfg, dataset, model_cfg) -> RunPlan:
    """The run of ``cfg`` over the built index ``dataset``; every check of the data against the
    config and the model (fails with a ConfigError naming the key)."""
    from megasyne.training.batches import check_vocabulary
    from megasyne.training.documents import eod_token_id

    G = cfg.global_batch_size
    try:
        check_vocabulary(dataset, model_cfg.vocab_size, f"recipe {cfg.recipe}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    eod_id = eod_token_id(dataset, cfg.document_masking, f"recipe {cfg.recipe}")
    if dataset.seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"recipe seq_length {dataset.seq_length} exceeds the model's "
                          f"max_position_embeddings {model_cfg.max_position_embeddings}")
    run_steps = cfg.train_steps or len(dataset) // G
    if run_steps * G > len(dataset):
        raise ConfigError(f"train_steps {run_steps} x global_batch_size {G} needs "
                          f"{run_steps * G} samples but the recipe {cfg.recipe} provides "
                          f"{len(dataset)} (at most {len(dataset) // G} steps)")
    stage_ranges = stage_step_ranges(dataset.stage_boundaries, dataset.stage_names, G, run_steps)
    named = [("stop_after_stage", cfg.stop_after_stage)] if cfg.stop_after_stage else []
    named += [(f"stage_settings.{n}", n) for n in cfg.stage_settings]
    for key, name in named:
        if name not in stage_ranges:
            raise ConfigError(f"{key}: the recipe {cfg.recipe} has no stage {name!r}; "
                              f"its stages are {list(stage_ranges)}")
    total_steps = stage_ranges[cfg.stop_after_stage][1] if cfg.stop_after_stage else run_steps
    return RunPlan(run_steps=run_steps, total_steps=total_steps, global_batch_size=G,
                   stage_names=tuple(dataset.stage_names),
                   stage_boundaries=tuple(int(b) for b in dataset.stage_boundaries),
                   stage_ranges=stage_ranges, eod_id=eod_id)
