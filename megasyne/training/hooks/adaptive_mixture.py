"""The adaptive topic mixture inside the trainer (Llama-3-SynE): measure, decide, re-blend.

Every ``interval_steps`` steps the trainer evaluates the held-out set (its eval recipe holds a
source per topic, named like the training recipe's topic sources), the update rule of
``megasyne.syne.topic_mixture`` turns the per-topic validation perplexities into new topic ratios,
and ``megasyne.data.overlay`` re-blends the next interval's samples with them. A baseline
measurement happens before the first step. Decisions go to metrics.jsonl (key ``adaptive``); the
state goes into every checkpoint, so a resumed run makes the same decisions and reads the same
samples.

Topics come in groups (``megasyne.syne.topic_groups``): each group's share of a stage stays the
recipe's and its ratios split it, so ``groups: {zh_web: ..., en_web: ...}`` adapts each
language's web topics inside that language's fixed web share. ``topics: [...]`` is one group
(its records and checkpoint state keep their one-group form).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megasyne.data.overlay import MixtureOverlay
from megasyne.syne.topic_groups import GroupedMixture, check_groups_against_recipe, group_rules
from megasyne.syne.topic_mixture import AdaptiveConfig, AdaptiveMixtureError
from megasyne.training.hooks import Hook, HookContext

ONE_GROUP = "topics"
"""The name of the one group of the ``topics: [...]`` form."""


@dataclass(kw_only=True, frozen=True)
class AdaptiveTrainConfig:
    interval_steps: int
    """Steps between adjustments (K), the same for every group (one evaluation measures all)."""
    topics: tuple | None = None
    """One group: training-recipe source names that are topics (e.g. sources with
    ``where: {topic: k}``); the eval recipe must have sources with the same names. Give this or
    ``groups``."""
    groups: dict | None = None
    """Several groups, each re-weighted inside its own share: ``{name: {topics: [...], alpha,
    weights, lower, upper, normalise}}`` (all but topics optional, defaulting to the values
    below). A group's topics must hang from one node of the recipe's weight tree (e.g. the
    topic sources under ``zh_web``), so that language and source shares stay the recipe's."""
    alpha: float = 0.5
    """f_i = 1 + alpha * delta_i * w_i."""
    weights: dict | float | None = None
    """w_i per topic (default 1)."""
    lower: dict | float | None = None
    """Lowest ratio per topic, inside its group (default 0)."""
    upper: dict | float | None = None
    """Highest ratio per topic, inside its group (default 1)."""
    normalise: str = "max_abs"
    """How the relative perplexity changes are normalised into delta_i."""

    def __post_init__(self):
        if (self.topics is None) == (self.groups is None):
            raise AdaptiveMixtureError(
                "adaptive: give either topics: [...] (one group) or groups: {name: {topics: "
                "[...]}, ...} (each group re-weighted inside its own share), not both or neither")
        if self.topics is not None:
            if isinstance(self.topics, str) or not isinstance(self.topics, (list, tuple)):
                raise AdaptiveMixtureError(f"adaptive.topics must be a list of training-recipe "
                                           f"source names, got {self.topics!r}")
            object.__setattr__(self, "topics", tuple(self.topics))
        elif isinstance(self.groups, dict):  # YAML-able: the resolved config goes to config.yaml
            object.__setattr__(self, "groups", {str(n): _plain(g) for n, g in self.groups.items()})
        if self.interval_steps < 1:
            raise AdaptiveMixtureError(f"adaptive.interval_steps must be >= 1, got "
                                       f"{self.interval_steps}")
        self.rules()  # validates alpha, bounds, weights and the groups

    def rules(self) -> dict[str, AdaptiveConfig]:
        """One update rule per group (the ``topics`` form: one group named ``topics``)."""
        if self.groups is None:
            return {ONE_GROUP: AdaptiveConfig(
                topics=self.topics, alpha=self.alpha, weights=self.weights, lower=self.lower,
                upper=self.upper, normalise=self.normalise)}
        return group_rules(self.groups, alpha=self.alpha, weights=self.weights, lower=self.lower,
                           upper=self.upper, normalise=self.normalise)

    def topics_path(self, group: str) -> str:
        """The config field that lists ``group``'s topics (for errors)."""
        return "adaptive.topics" if self.groups is None else f"adaptive.groups.{group}.topics"


def _plain(group):
    """A group's spec with its topics as a list (validated later by ``group_rules``)."""
    if isinstance(group, dict) and isinstance(group.get("topics"), (list, tuple)):
        return {**group, "topics": list(group["topics"])}
    return group


class AdaptiveMixtureHook(Hook):
    """Owns the ratios, the re-blended intervals and the decision log of one run."""

    key = "adaptive"
    changes_data = True  # re-blends the samples of the next interval in place

    def __init__(self, cfg: AdaptiveTrainConfig, dataset, eval_sources, run_dir: Path, *,
                 global_batch_size: int, is_writer: bool, fault_growth: dict | None = None):
        rules = cfg.rules()
        for name, rule in rules.items():
            at = cfg.topics_path(name)
            missing = [t for t in rule.topics if t not in dataset.source_names]
            if missing:
                raise AdaptiveMixtureError(f"{at}: {missing} are not sources of the training "
                                           f"recipe (sources: {list(dataset.source_names)})")
            missing = [t for t in rule.topics if t not in eval_sources]
            if missing:
                raise AdaptiveMixtureError(f"{at}: {missing} have no source of that name in the "
                                           f"eval recipe (sources: {list(eval_sources)}): their "
                                           f"perplexity is needed")
        check_groups_against_recipe(dataset.meta["inputs"]["recipe"]["stages"],
                                    {cfg.topics_path(n): r.topics for n, r in rules.items()})
        self.cfg, self.G, self.is_writer = cfg, global_batch_size, is_writer
        self.grouped = cfg.groups is not None
        self.num_samples = len(dataset)
        self.overlay = MixtureOverlay(dataset, run_dir / "adaptive")
        self.mixture = GroupedMixture(rules, [self.overlay.stage_weights(k)
                                              for k in range(len(dataset.stage_names))])
        self.fault_growth = dict(fault_growth or {})
        unknown = sorted(set(self.fault_growth) - set(self.mixture.topics))
        if unknown:
            raise AdaptiveMixtureError(f"fault_topic_ppl_growth: {unknown} are not adaptive "
                                       f"topics (topics: {self.mixture.topics})")

    def due(self, step: int) -> bool:
        """Every K steps (and at step 0: the baseline), while the recipe has samples left."""
        return step % self.cfg.interval_steps == 0 and step * self.G < self.num_samples

    def run(self, step: int, ctx: HookContext) -> dict:
        decision = self.decide(step, ctx.validation())
        if step:
            from megasyne.training.metrics import print0

            groups = decision["groups"] if self.grouped else {ONE_GROUP: decision}
            print0(f"adaptive mixture at step {step}: " + "; ".join(
                (f"{name}: " if self.grouped else "") + ", ".join(
                    f"{t}={r:.3f}" for t, r in zip(d["topics"], d["new_ratios"]))
                for name, d in groups.items()))
        return decision

    def _weights_of_stage(self, k: int) -> dict:
        return self.mixture.weights(self.overlay.stage_weights(k))

    def _measured(self, step: int, eval_result: dict) -> dict:
        """Every topic's validation perplexity after ``step`` steps."""
        ppl = {}
        for t in self.mixture.topics:
            key = f"{t}/ppl"
            if key not in eval_result:
                raise AdaptiveMixtureError(f"adaptive: the evaluation at step {step} has no {key} "
                                           f"(eval_samples too small to reach every topic?)")
            # Testing hook (like fault_nan_steps): a topic's measured perplexity grows by this
            # rate per interval, to exercise the rule end to end on a tiny model.
            growth = (1.0 + self.fault_growth.get(t, 0.0)) ** (step // self.cfg.interval_steps)
            ppl[t] = eval_result[key] * growth
        return ppl

    def decide(self, step: int, eval_result: dict) -> dict:
        """Observe the topics' perplexity after ``step`` steps; re-blend the next interval."""
        decisions = {name: d.to_dict() for name, d in
                     self.mixture.observe(step, self._measured(step, eval_result)).items()}
        decision = {"step": step, "groups": decisions} if self.grouped else decisions[ONE_GROUP]
        if step > 0:
            arrays = self.overlay.reblend(step * self.G, (step + self.cfg.interval_steps) * self.G,
                                          self._weights_of_stage)
            if arrays and self.is_writer:
                self.overlay.save(arrays)
            decision["interval"] = [step * self.G, step * self.G + len(arrays.get("source_id", []))]
        return decision

    def state_dict(self) -> dict:
        state = self.mixture.state_dict()
        return {"groups": state} if self.grouped else state[ONE_GROUP]

    def load_state_dict(self, state: dict | None, *, checkpoint: str) -> int:
        """Restore the ratios and re-apply the intervals decided up to the saved state."""
        if state is None or self.grouped != ("groups" in state):
            saved = ("without the adaptive mixture" if state is None else
                     "with adaptive.groups" if "groups" in state else "with adaptive.topics")
            raise AdaptiveMixtureError(f"{checkpoint} was saved {saved}; resume it with the same "
                                       f"adaptive settings it was started with")
        try:
            self.mixture.load_state_dict(state["groups"] if self.grouped else {ONE_GROUP: state})
        except AdaptiveMixtureError as exc:
            raise AdaptiveMixtureError(f"{checkpoint}: {exc}") from None
        last = self.mixture.last_step
        if last is None or last == 0:
            return 0
        return self.overlay.load_through(last * self.G)
