"""Adaptive topic groups: the update rule of ``topic_mixture`` applied inside each group's share.

Llama-3-SynE adapts the topics *within* each language's web data (docs/recipe.md). A stage's
weights come from the recipe's weight tree (language -> source -> topic); a group is a set of
topic sources that are children of one node of that tree (the topics of ``zh_web``, those of
``en_web``). Each group has its own ratios ``r`` (moved by the paper's rule from its own topics'
perplexities), and only the split of the group's share moves::

    w'_t = (sum_{u in g} w_u) * r_t      every topic t of group g
    w'_s = w_s                           every source in no group

The weights of every source outside the groups are untouched and each group's sum is kept, so
every node of the tree above a group (``zh_web``, ``zh``) keeps its recipe weight, and the
mixture index's exactness at every prefix (``megasyne.data.overlay``) applies to the language
and source shares of every re-blended interval. One group across two parents would move weight
between them: with Chinese and English web topics in one group the zh web share went from
0.14 to 0.18 of the samples and en web from 0.32 to 0.28, breaking zh:en = 2:8.
:func:`check_groups_against_recipe` refuses such groups.

Pure Python, no torch: the trainer's hook (``megasyne.training.hooks.adaptive_mixture``) owns
one :class:`GroupedMixture`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from megasyne.syne.topic_mixture import AdaptiveConfig, AdaptiveMixture, AdaptiveMixtureError

GROUP_KEYS = ("topics", "alpha", "weights", "lower", "upper", "normalise")
"""What a group of ``adaptive.groups`` may set; all but ``topics`` default to the section's."""


def group_rules(groups, *, alpha: float, weights, lower, upper, normalise: str,
                where: str = "adaptive") -> dict[str, AdaptiveConfig]:
    """``adaptive.groups`` as one update rule per group, in config order.

    A group's ``alpha`` / ``weights`` / ``lower`` / ``upper`` / ``normalise`` override the
    section's; a section-level ``{topic: value}`` mapping goes to the group of each topic.
    """
    if not isinstance(groups, Mapping) or not groups:
        raise AdaptiveMixtureError(f"{where}.groups must be a non-empty mapping of group name -> "
                                   f"{{topics: [...], alpha, weights, lower, upper, normalise}}")
    owner: dict[str, str] = {}
    for name, spec in groups.items():
        at = f"{where}.groups.{name}"
        if not isinstance(spec, Mapping):
            raise AdaptiveMixtureError(f"{at} must be a mapping with topics: [...] (and optionally "
                                       f"{', '.join(GROUP_KEYS[1:])})")
        unknown = sorted(set(spec) - set(GROUP_KEYS))
        if unknown:
            raise AdaptiveMixtureError(f"unknown keys in {at}: {unknown}; known: {list(GROUP_KEYS)} "
                                       f"(interval_steps is shared by all groups)")
        topics = spec.get("topics")
        if isinstance(topics, str) or not isinstance(topics, (list, tuple)) or not topics:
            raise AdaptiveMixtureError(f"{at}.topics must be a non-empty list of training-recipe "
                                       f"source names, got {topics!r}")
        for t in topics:
            if t in owner and owner[t] != name:
                raise AdaptiveMixtureError(
                    f"topic {t!r} is in two groups, {where}.groups.{owner[t]} and {at}: a topic's "
                    f"ratio belongs to one group; remove it from one of them")
            owner[t] = name
    for key, value in (("weights", weights), ("lower", lower), ("upper", upper)):
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(owner))
            if unknown:
                raise AdaptiveMixtureError(f"{where}.{key}: unknown topics {unknown} (the groups' "
                                           f"topics: {sorted(owner)})")
    rules = {}
    for name, spec in groups.items():
        topics = tuple(str(t) for t in spec["topics"])

        def pick(key, default, topics=topics, spec=spec):
            if key in spec:
                return spec[key]
            if isinstance(default, Mapping):  # the section's per-topic values of this group
                return {t: v for t, v in default.items() if t in topics}
            return default

        rules[str(name)] = AdaptiveConfig(
            topics=topics, alpha=pick("alpha", alpha), weights=pick("weights", weights),
            lower=pick("lower", lower), upper=pick("upper", upper),
            normalise=pick("normalise", normalise), where=f"{where}.groups.{name}")
    return rules


def leaf_parents(weights: Mapping, path: str = "weights") -> dict[str, str]:
    """Every source of a stage's weight tree (``StageConfig.to_dict()['weights']``) -> the
    field path of the node it hangs from (``weights`` for the top level)."""
    out: dict[str, str] = {}
    for name, spec in weights.items():
        if isinstance(spec, Mapping) and "children" in spec:
            out.update(leaf_parents(spec["children"], f"{path}.{name}"))
        else:
            out[str(name)] = path
    return out


def check_groups_against_recipe(stages: Sequence[Mapping], groups: Mapping[str, Sequence[str]]):
    """Refuse groups whose re-weighting would change a share the recipe fixes.

    ``stages``: the recipe's stages as dicts (``Recipe.to_dict()['stages']``: name, weights
    tree); ``groups``: the config path of each group's topic list -> its topics. In every stage
    a group's topics must all hang from the same node of the weight tree (else weight moves
    between languages or sources), and be weighted all or not at all (a ratio for a topic the
    stage leaves out would give it samples there).
    """
    for k, stage in enumerate(stages):
        parents = leaf_parents(stage["weights"], f"stages[{k}].weights")
        for at, topics in groups.items():
            present = [t for t in topics if t in parents]
            if present and len(present) != len(topics):
                missing = [t for t in topics if t not in parents]
                raise AdaptiveMixtureError(
                    f"{at}: stage {stage['name']!r} weights {present} but not {missing}: a group's "
                    f"ratios split its share among all its topics, so give every topic of a "
                    f"group a weight in the same stages (or none of them)")
            under = {}
            for t in present:
                under.setdefault(parents[t], []).append(t)
            if len(under) > 1:
                where = "; ".join(f"{ts} under {p}" for p, ts in under.items())
                raise AdaptiveMixtureError(
                    f"{at}: the topics do not share a parent in stage {stage['name']!r} ({where}): "
                    f"re-weighting them would move samples between those parents and change "
                    f"shares the recipe fixes (e.g. zh:en); make one group per parent with "
                    f"adaptive.groups")


def split_group_shares(weights: Mapping[str, float],
                       groups: Sequence[tuple[Sequence[str], Sequence[float]]]) -> dict[str, float]:
    """A stage's {source: weight} with each group's share split by its ratios (module docstring).

    ``groups``: (topics, ratios) pairs. A group the stage does not weight stays at 0.
    """
    out = dict(weights)
    for topics, ratios in groups:
        share = sum(weights.get(t, 0.0) for t in topics)
        if share > 0:
            for t, r in zip(topics, ratios):
                out[t] = share * r
    return out


def initial_ratios(stage_weights: Sequence[Mapping[str, float]], topics: Sequence[str]) -> list:
    """The recipe's split of a group's share in the first stage that weights it (equal if none)."""
    for w in stage_weights:
        initial = [float(w.get(t, 0.0)) for t in topics]
        if sum(initial) > 0:
            return initial
    return [1.0] * len(topics)


class GroupedMixture:
    """One :class:`AdaptiveMixture` per group, observed at the same steps."""

    def __init__(self, rules: Mapping[str, AdaptiveConfig],
                 stage_weights: Sequence[Mapping[str, float]]):
        self.mixtures = {name: AdaptiveMixture(rule, initial_ratios(stage_weights, rule.topics))
                         for name, rule in rules.items()}

    @property
    def topics(self) -> list[str]:
        return [t for m in self.mixtures.values() for t in m.cfg.topics]

    @property
    def last_step(self) -> int | None:
        return next(iter(self.mixtures.values())).last_step

    def observe(self, step: int, ppl: Mapping[str, float]) -> dict:
        """Every group's decision (``MixtureDecision``) from the perplexity of every topic."""
        return {name: m.observe(step, [ppl[t] for t in m.cfg.topics])
                for name, m in self.mixtures.items()}

    def weights(self, stage_weights: Mapping[str, float]) -> dict[str, float]:
        """A stage's weights with every group's share split by its current ratios."""
        return split_group_shares(stage_weights, [(m.cfg.topics, m.ratios)
                                                  for m in self.mixtures.values()])

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.mixtures.items()}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or set(state) != set(self.mixtures):
            got = list(state) if isinstance(state, Mapping) else state
            raise AdaptiveMixtureError(f"adaptive state has groups {got}, this run has "
                                       f"{list(self.mixtures)}: resume with the same "
                                       f"adaptive.groups the run was started with")
        for name, m in self.mixtures.items():
            m.load_state_dict(state[name])
        steps = {m.last_step for m in self.mixtures.values()}
        if len(steps) != 1:
            raise AdaptiveMixtureError(f"adaptive state: the groups were last adjusted at "
                                       f"different steps {sorted(steps, key=str)}")


__all__ = ["GROUP_KEYS", "GroupedMixture", "check_groups_against_recipe", "group_rules",
           "initial_ratios", "leaf_parents", "split_group_shares"]
