"""The adaptive topic mixture inside the trainer (Llama-3-SynE): measure, decide, re-blend.

Every ``interval_steps`` steps the trainer evaluates the held-out set (its eval recipe holds a
source per topic, named like the training recipe's topic sources), the update rule of
``megasyne.syne.topic_mixture`` turns the per-topic validation perplexities into new topic ratios,
and ``megasyne.data.overlay`` re-blends the next interval's samples with them. The topics'
total share of each stage stays the recipe's; the ratios split it. A baseline measurement
happens before the first step. Decisions go to metrics.jsonl (key ``adaptive``); the state
goes into every checkpoint, so a resumed run makes the same decisions and reads the same
samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megasyne.data.overlay import MixtureOverlay
from megasyne.syne.topic_mixture import AdaptiveConfig, AdaptiveMixture
from megasyne.training.hooks import Hook, HookContext


@dataclass(kw_only=True, frozen=True)
class AdaptiveTrainConfig:
    topics: tuple
    """Training-recipe source names that are topics (e.g. sources with ``where: {topic: k}``);
    the eval recipe must have sources with the same names."""
    interval_steps: int
    """Steps between adjustments (K)."""
    alpha: float = 0.5
    """f_i = 1 + alpha * delta_i * w_i."""
    weights: dict | float | None = None
    """w_i per topic (default 1)."""
    lower: dict | float | None = None
    """Lowest ratio per topic (default 0)."""
    upper: dict | float | None = None
    """Highest ratio per topic (default 1)."""
    normalise: str = "max_abs"
    """How the relative perplexity changes are normalised into delta_i."""

    def __post_init__(self):
        object.__setattr__(self, "topics", tuple(self.topics))
        if self.interval_steps < 1:
            raise ValueError(f"adaptive.interval_steps must be >= 1, got {self.interval_steps}")
        self.rule()  # validates alpha, bounds, weights

    def rule(self) -> AdaptiveConfig:
        return AdaptiveConfig(topics=self.topics, alpha=self.alpha, weights=self.weights,
                              lower=self.lower, upper=self.upper, normalise=self.normalise)


class AdaptiveMixtureHook(Hook):
    """Owns the ratios, the re-blended intervals and the decision log of one run."""

    key = "adaptive"

    def __init__(self, cfg: AdaptiveTrainConfig, dataset, eval_sources, run_dir: Path, *,
                 global_batch_size: int, is_writer: bool, fault_growth: dict | None = None):
        missing = [t for t in cfg.topics if t not in dataset.source_names]
        if missing:
            raise ValueError(f"adaptive.topics {missing} are not sources of the training recipe "
                             f"(sources: {list(dataset.source_names)})")
        missing = [t for t in cfg.topics if t not in eval_sources]
        if missing:
            raise ValueError(f"adaptive.topics {missing} have no source of that name in the eval "
                             f"recipe (sources: {list(eval_sources)}): their perplexity is needed")
        self.cfg, self.G, self.is_writer = cfg, global_batch_size, is_writer
        self.num_samples = len(dataset)
        self.fault_growth = dict(fault_growth or {})
        self.overlay = MixtureOverlay(dataset, run_dir / "adaptive")
        first = self.overlay.stage_weights(0)
        initial = [first.get(t, 0.0) for t in cfg.topics]
        if sum(initial) <= 0:
            initial = [1.0] * len(cfg.topics)
        self.mixture = AdaptiveMixture(cfg.rule(), initial)

    def due(self, step: int) -> bool:
        """Every K steps (and at step 0: the baseline), while the recipe has samples left."""
        return step % self.cfg.interval_steps == 0 and step * self.G < self.num_samples

    def run(self, step: int, ctx: HookContext) -> dict:
        decision = self.decide(step, ctx.validation())
        if step:
            from megasyne.training.metrics import print0

            print0(f"adaptive mixture at step {step}: " + ", ".join(
                f"{t}={r:.3f}" for t, r in zip(decision["topics"], decision["new_ratios"])))
        return decision

    def _weights_of_stage(self, k: int) -> dict:
        w = self.overlay.stage_weights(k)
        share = sum(w.get(t, 0.0) for t in self.cfg.topics)
        if share > 0:
            for t, r in zip(self.cfg.topics, self.mixture.ratios):
                w[t] = share * r
        return w

    def decide(self, step: int, eval_result: dict) -> dict:
        """Observe the topics' perplexity after ``step`` steps; re-blend the next interval."""
        ppl = []
        for t in self.cfg.topics:
            key = f"{t}/ppl"
            if key not in eval_result:
                from megasyne.errors import ConfigError

                raise ConfigError(f"adaptive: the evaluation at step {step} has no {key} "
                                 f"(eval_samples too small to reach every topic?)")
            # Testing hook (like fault_nan_steps): a topic's measured perplexity grows by this
            # rate per interval, to exercise the rule end to end on a tiny model.
            growth = (1.0 + self.fault_growth.get(t, 0.0)) ** (step // self.cfg.interval_steps)
            ppl.append(eval_result[key] * growth)
        decision = self.mixture.observe(step, ppl).to_dict()
        if step > 0:
            arrays = self.overlay.reblend(step * self.G, (step + self.cfg.interval_steps) * self.G,
                                          self._weights_of_stage)
            if arrays and self.is_writer:
                self.overlay.save(arrays)
            decision["interval"] = [step * self.G, step * self.G + len(arrays.get("source_id", []))]
        return decision

    def state_dict(self) -> dict:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict | None, *, checkpoint: str) -> int:
        """Restore the ratios and re-apply the intervals decided up to the saved state."""
        if state is None:
            from megasyne.training.config import ConfigError

            raise ConfigError(f"{checkpoint} was saved without the adaptive mixture; resume it "
                              f"with the same adaptive settings it was started with")
        self.mixture.load_state_dict(state)
        last = self.mixture.last_step
        if last is None or last == 0:
            return 0
        return self.overlay.load_through(last * self.G)
