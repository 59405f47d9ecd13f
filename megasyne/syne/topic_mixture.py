"""The adaptive topic mixture of Llama-3-SynE: a pure update rule and its JSON-able decision record.

At each adjustment point t (every K steps) the trainer measures the validation perplexity of every
topic i, ``p_i(t)``, and moves the topic ratios::

    d_i     = (p_i(t) - p_i(t-1)) / p_i(t-1)          relative change since the last point
    delta_i = normalise(d)_i                           "max_abs": d_i / max_j |d_j|  (in [-1, 1])
                                                       "sum_abs": d_i / sum_j |d_j|
                                                       "none":    d_i
    f_i     = 1 + alpha * delta_i * w_i                w_i: the topic's weight (config, default 1)
    r_i(t)  = r_i(t-1) f_i / sum_j r_j(t-1) f_j
    then clamp to [lower_i, upper_i] with renormalisation (below).

A topic whose perplexity rose (it is being forgotten or not yet learnt) gets f_i > 1 and a larger
share; one that improved gets f_i < 1. ``w_i`` lets a run care more about some topics (the paper
names it without fixing it; it is configuration here, see docs/recipe.md). When every d_i is 0
the ratios stay.

Clamping keeps the proportions of the topics that stay inside their bounds: the result is
``clip(c * r_i, lower_i, upper_i)`` with the one scale ``c`` for which the ratios sum to 1 (solved
exactly on the piecewise-linear sum, no iteration). It is feasible iff
``sum(lower) <= 1 <= sum(upper)``, checked when the config is made.

Everything here is deterministic and free of torch/Megatron: the trainer calls
:meth:`AdaptiveMixture.observe` at each point, logs the returned :class:`MixtureDecision`
(``to_dict()`` is plain JSON) and stores :meth:`AdaptiveMixture.state_dict` in its checkpoint, so a
resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megasyne.errors import ConfigError

NORMALISE_MODES = ("max_abs", "sum_abs", "none")


class AdaptiveMixtureError(ConfigError):
    """A bad adaptive-mixture configuration or measurement (the message names the field/topic)."""


def _per_topic(value, topics: tuple[str, ...], name: str, default: float,
               where: str = "adaptive") -> tuple[float, ...]:
    """A scalar, a {topic: value} mapping (missing -> default) or None, as one float per topic."""
    if value is None:
        return tuple(float(default) for _ in topics)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return tuple(float(value) for _ in topics)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(topics))
        if unknown:
            raise AdaptiveMixtureError(f"{where}.{name}: unknown topics {unknown} "
                                       f"(topics: {list(topics)})")
        return tuple(float(value.get(t, default)) for t in topics)
    raise AdaptiveMixtureError(f"{where}.{name}: expected a number or a {{topic: number}} "
                               f"mapping, got {type(value).__name__}")


@dataclass(kw_only=True, frozen=True)
class AdaptiveConfig:
    """How ratios move: the topics, alpha, per-topic weights w_i and bounds, and the normalisation."""

    topics: tuple[str, ...]
    """Topic names, in the order every vector here uses."""
    alpha: float = 0.5
    """Step size of the update: f_i = 1 + alpha * delta_i * w_i."""
    weights: dict[str, float] | float | None = None
    """w_i per topic (a number for all; missing topics: 1.0)."""
    lower: dict[str, float] | float | None = None
    """Lowest ratio per topic (default 0.0)."""
    upper: dict[str, float] | float | None = None
    """Highest ratio per topic (default 1.0)."""
    normalise: str = "max_abs"
    """How d is normalised into delta: max_abs | sum_abs | none."""
    min_factor: float = 1e-3
    """Floor for f_i (only reachable with normalise='none' or alpha * w_i >= 1): a topic's ratio
    never drops to 0 in one step."""
    where: str = "adaptive"
    """The config path that errors name (``adaptive.groups.zh_web`` for a topic group)."""

    def __post_init__(self) -> None:
        at = self.where
        topics = tuple(str(t) for t in self.topics)
        object.__setattr__(self, "topics", topics)
        if not topics or len(set(topics)) != len(topics):
            raise AdaptiveMixtureError(f"{at}.topics must be distinct and non-empty: {topics}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise AdaptiveMixtureError(f"{at}.alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.normalise not in NORMALISE_MODES:
            raise AdaptiveMixtureError(f"{at}.normalise must be one of {NORMALISE_MODES}, "
                                       f"got {self.normalise!r}")
        if not 0 < self.min_factor <= 1:
            raise AdaptiveMixtureError(f"{at}.min_factor must be in (0, 1], got {self.min_factor}")
        w, lo, hi = self.w, self.lo, self.hi
        for name, vec in (("weights", w), ("lower", lo), ("upper", hi)):
            for t, v in zip(topics, vec):
                if not math.isfinite(v) or v < 0:
                    raise AdaptiveMixtureError(f"{at}.{name}.{t}: must be finite and >= 0, got {v}")
        for t, a, b in zip(topics, lo, hi):
            if a > b or b > 1:
                raise AdaptiveMixtureError(f"{at} bounds of {t}: need 0 <= lower <= upper <= 1, "
                                           f"got [{a}, {b}]")
        if sum(lo) > 1 + 1e-12 or sum(hi) < 1 - 1e-12:
            raise AdaptiveMixtureError(f"{at} bounds are infeasible: sum(lower) = {sum(lo):.6g} "
                                       f"must be <= 1 <= sum(upper) = {sum(hi):.6g}")

    @property
    def w(self) -> tuple[float, ...]:
        return _per_topic(self.weights, self.topics, "weights", 1.0, self.where)

    @property
    def lo(self) -> tuple[float, ...]:
        return _per_topic(self.lower, self.topics, "lower", 0.0, self.where)

    @property
    def hi(self) -> tuple[float, ...]:
        return _per_topic(self.upper, self.topics, "upper", 1.0, self.where)


@dataclass(kw_only=True)
class MixtureDecision:
    """One adjustment, everything needed to redo it by hand; ``to_dict()`` is plain JSON."""

    step: int
    """Training step of the adjustment point."""
    topics: list[str]
    previous_ratios: list[float]
    """r(t-1)."""
    new_ratios: list[float]
    """r(t) after clamping (== previous_ratios when nothing changed)."""
    ppl: list[float]
    """Validation perplexity per topic measured now, p(t)."""
    previous_ppl: list[float] | None
    """p(t-1); None at the first (baseline) measurement."""
    change: list[float] | None = None
    """d_i, relative change of perplexity."""
    delta: list[float] | None = None
    """d normalised."""
    factors: list[float] | None = None
    """f_i."""
    unclamped_ratios: list[float] | None = None
    """r_i(t-1) f_i / sum_j r_j(t-1) f_j before clamping."""
    clamped: list[str] = field(default_factory=list)
    """Topics held at a bound."""
    alpha: float = 0.0
    weights: list[float] | None = None
    normalise: str = "max_abs"
    reason: str = ""
    """'baseline' (first measurement: ratios kept), 'no change' (all d_i == 0) or 'adjusted'."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MixtureDecision:
        return cls(**d)


def relative_change(previous_ppl, ppl) -> list[float]:
    """d_i = (p_i(t) - p_i(t-1)) / p_i(t-1)."""
    return [(b - a) / a for a, b in zip(previous_ppl, ppl)]


def normalise_change(change, mode: str) -> list[float]:
    """delta from d: max_abs -> d / max|d|, sum_abs -> d / sum|d|, none -> d (all-zero stays 0)."""
    if mode == "none":
        return list(change)
    scale = max(abs(x) for x in change) if mode == "max_abs" else sum(abs(x) for x in change)
    if mode not in NORMALISE_MODES:
        raise AdaptiveMixtureError(f"unknown normalisation {mode!r}")
    return [0.0 for _ in change] if scale == 0 else [x / scale for x in change]


def factors(delta, weights, alpha: float, min_factor: float = 1e-3) -> list[float]:
    """f_i = max(1 + alpha * delta_i * w_i, min_factor)."""
    return [max(1.0 + alpha * d * w, min_factor) for d, w in zip(delta, weights)]


def reweight(ratios, f) -> list[float]:
    """r_i f_i / sum_j r_j f_j."""
    total = sum(r * x for r, x in zip(ratios, f))
    if total <= 0:
        raise AdaptiveMixtureError("every topic ratio is 0: nothing to reweight")
    return [r * x / total for r, x in zip(ratios, f)]


def clamp_ratios(ratios, lower, upper) -> tuple[list[float], list[int]]:
    """``clip(c * r_i, lower_i, upper_i)`` summing to 1, and the indices held at a bound.

    The sum ``g(c)`` is continuous, non-decreasing and piecewise linear in ``c`` with breakpoints
    ``lower_i / r_i`` and ``upper_i / r_i``: find the piece where it crosses 1 and solve exactly.
    """
    n = len(ratios)
    if all(lo - 1e-15 <= r <= hi + 1e-15 for r, lo, hi in zip(ratios, lower, upper)) \
            and abs(sum(ratios) - 1) <= 1e-12:
        return [min(max(r, lo), hi) for r, lo, hi in zip(ratios, lower, upper)], []

    def g(c: float) -> float:
        return sum(min(max(c * r, lo), hi) for r, lo, hi in zip(ratios, lower, upper))

    points = sorted({0.0, *(lo / r for r, lo in zip(ratios, lower) if r > 0),
                     *(hi / r for r, hi in zip(ratios, upper) if r > 0)})
    if g(points[-1]) < 1 - 1e-12 or g(0.0) > 1 + 1e-12:
        raise AdaptiveMixtureError(f"cannot clamp {ratios} into bounds {list(zip(lower, upper))}: "
                                   "the bounds cannot sum to 1 for these topics")
    c = points[-1]
    for a, b in zip(points, points[1:]):
        ga, gb = g(a), g(b)
        if gb >= 1 - 1e-15:
            c = a if gb == ga else a + (1 - ga) * (b - a) / (gb - ga)  # linear on [a, b]
            break
    out = [min(max(c * r, lo), hi) for r, lo, hi in zip(ratios, lower, upper)]
    held = [i for i in range(n) if (out[i] == lower[i] and c * ratios[i] < lower[i])
            or (out[i] == upper[i] and c * ratios[i] > upper[i])]
    return out, held


def _check_ppl(topics, ppl, what: str) -> list[float]:
    if len(ppl) != len(topics):
        raise AdaptiveMixtureError(f"{what}: {len(ppl)} values for {len(topics)} topics {list(topics)}")
    out = []
    for t, p in zip(topics, ppl):
        p = float(p)
        if not math.isfinite(p) or p <= 0:
            raise AdaptiveMixtureError(f"{what}.{t}: perplexity must be finite and > 0, got {p}")
        out.append(p)
    return out


def adapt(cfg: AdaptiveConfig, *, step: int, ratios, previous_ppl, ppl) -> MixtureDecision:
    """One adjustment: r(t-1), p(t-1) (None: baseline), p(t) -> the decision with r(t)."""
    topics = cfg.topics
    ratios = [float(r) for r in ratios]
    if len(ratios) != len(topics) or any(r < 0 or not math.isfinite(r) for r in ratios) \
            or abs(sum(ratios) - 1) > 1e-6:
        raise AdaptiveMixtureError(f"previous ratios {ratios} must be {len(topics)} values >= 0 "
                                   "summing to 1")
    ppl = _check_ppl(topics, ppl, "ppl")
    base = dict(step=int(step), topics=list(topics), previous_ratios=ratios, ppl=ppl,
                alpha=cfg.alpha, weights=list(cfg.w), normalise=cfg.normalise)
    if previous_ppl is None:
        return MixtureDecision(**base, previous_ppl=None, new_ratios=list(ratios), reason="baseline")
    previous_ppl = _check_ppl(topics, previous_ppl, "previous_ppl")
    change = relative_change(previous_ppl, ppl)
    delta = normalise_change(change, cfg.normalise)
    f = factors(delta, cfg.w, cfg.alpha, cfg.min_factor)
    unclamped = reweight(ratios, f)
    new, held = clamp_ratios(unclamped, cfg.lo, cfg.hi)
    reason = "no change" if all(x == 0 for x in change) else "adjusted"
    return MixtureDecision(**base, previous_ppl=previous_ppl, change=change, delta=delta,
                           factors=f, unclamped_ratios=unclamped, new_ratios=new,
                           clamped=[topics[i] for i in held], reason=reason)


class AdaptiveMixture:
    """The running state: current ratios and the last measured perplexities.

    ``observe(step, ppl)`` returns the decision and moves the state; ``state_dict()`` /
    ``load_state_dict()`` carry it through a checkpoint (a resumed run decides identically).
    """

    def __init__(self, cfg: AdaptiveConfig, initial_ratios) -> None:
        self.cfg = cfg
        ratios = [float(r) for r in initial_ratios]
        total = sum(ratios)
        if len(ratios) != len(cfg.topics) or total <= 0 or any(r < 0 for r in ratios):
            raise AdaptiveMixtureError(f"initial ratios {ratios} must be {len(cfg.topics)} "
                                       "values >= 0 with a positive sum")
        self.ratios, _ = clamp_ratios([r / total for r in ratios], cfg.lo, cfg.hi)
        self.last_ppl: list[float] | None = None
        self.last_step: int | None = None

    def observe(self, step: int, ppl) -> MixtureDecision:
        if self.last_step is not None and step <= self.last_step:
            raise AdaptiveMixtureError(f"adjustment at step {step} is not after the last one "
                                       f"({self.last_step})")
        decision = adapt(self.cfg, step=step, ratios=self.ratios, previous_ppl=self.last_ppl,
                         ppl=ppl)
        self.ratios, self.last_ppl, self.last_step = decision.new_ratios, decision.ppl, step
        return decision

    def state_dict(self) -> dict:
        return {"topics": list(self.cfg.topics), "ratios": list(self.ratios),
                "last_ppl": None if self.last_ppl is None else list(self.last_ppl),
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("topics", [])) != list(self.cfg.topics):
            raise AdaptiveMixtureError(f"adaptive state is for topics {state.get('topics')}, "
                                       f"this run has {list(self.cfg.topics)}")
        self.ratios = [float(r) for r in state["ratios"]]
        self.last_ppl = None if state["last_ppl"] is None else [float(p) for p in state["last_ppl"]]
        self.last_step = state["last_step"]


__all__ = ["AdaptiveConfig", "AdaptiveMixture", "AdaptiveMixtureError", "MixtureDecision", "adapt",
           "clamp_ratios", "factors", "normalise_change", "relative_change", "reweight"]
