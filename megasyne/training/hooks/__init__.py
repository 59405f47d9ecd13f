"""Periodic features of a training run, each a :class:`Hook` in a file of its own.

The loop knows nothing of them: after every optimizer step (and once before the first step of
a fresh run, as step 0) it runs the hooks that are ``due(step)``, puts what each returns into
the step's metrics record under the hook's ``key``, and saves each hook's ``state_dict()``
into every checkpoint under the same key (restored with ``load_state_dict`` on resume). A new
periodic feature is a new file here and a line in :func:`build_hooks`.

- ``validation`` (key ``eval``): loss and perplexity per source on held-out data.
- ``adaptive_mixture`` (key ``adaptive``): the topic ratios re-weighted from the topics'
  validation perplexity, re-blending the next interval of samples.
- ``bench_probe`` (key ``bench``): multiple-choice benchmark accuracy.

Hooks share one validation per step through :meth:`HookContext.validation` (the adaptive
mixture reads the perplexities validation measured, or measures them itself when validation is
not due).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megasyne.training.trainer import Trainer


class Hook:
    """A periodic feature of the loop (see the module docstring)."""

    key: str = ""
    """Where its results go in a metrics record, and its state in a checkpoint."""
    changes_data: bool = False
    """True when ``run`` may change which samples the steps after it read (the adaptive
    mixture re-blends them): the trainer then reads again what it had read ahead."""

    def due(self, step: int) -> bool:
        """Whether to run after ``step`` optimizer steps (0: before the first step of a fresh run)."""
        raise NotImplementedError

    def run(self, step: int, ctx: HookContext) -> Any:
        """Do the work; the result (if not None) is logged under ``key``."""
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        """What a resumed run needs to continue exactly (None: nothing)."""
        return None

    def load_state_dict(self, state: dict | None, *, checkpoint: str) -> None:
        """Restore from a checkpoint's state (None when the checkpoint holds none)."""


@dataclass
class HookContext:
    """What hooks see at a step: the trainer and the step's metrics record."""

    trainer: Trainer
    record: dict

    def validation(self) -> dict:
        """This step's validation result, measured once however many hooks ask."""
        if "eval" not in self.record:
            self.record["eval"] = self.trainer.validator.measure(self.trainer.chunks)
        return self.record["eval"]


def build_hooks(trainer: Trainer) -> list[Hook]:
    """The hooks a run's config asks for, in the order they run at a step."""
    from megasyne.training.config import ConfigError

    cfg = trainer.cfg
    hooks: list[Hook] = []
    if cfg.eval_recipe and cfg.eval_interval:
        from megasyne.training.hooks.validation import ValidationHook

        hooks.append(ValidationHook(cfg.eval_interval))
    if cfg.adaptive is not None:
        from megasyne.training.hooks.adaptive_mixture import AdaptiveMixtureHook

        try:
            hooks.append(AdaptiveMixtureHook(
                cfg.adaptive, trainer.dataset, trainer.validator.eval_set.source_names,
                trainer.run_dir, global_batch_size=cfg.global_batch_size,
                is_writer=trainer.rank == 0, fault_growth=cfg.fault_topic_ppl_growth))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.bench_eval is not None:
        from megasyne.training.hooks.bench_probe import BenchProbeHook

        try:
            hooks.append(BenchProbeHook(cfg.bench_eval, trainer.model_cfg.vocab_size))
        except Exception as exc:  # bad task file, missing benchmark file, bad tokenizer
            raise ConfigError(f"bench_eval: {exc}") from None
    return hooks
