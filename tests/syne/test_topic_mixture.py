"""The adaptive topic-mixture rule against hand computations (megasyne/syne/topic_mixture.py)."""

import json

import pytest

from megasyne.syne.topic_mixture import (
    AdaptiveConfig,
    AdaptiveMixture,
    AdaptiveMixtureError,
    MixtureDecision,
    adapt,
    clamp_ratios,
)

T3 = ("math", "physics", "history")


def approx(values, rel=1e-12):
    return pytest.approx(values, rel=rel, abs=1e-15)


def test_formula_by_hand():
    # r = (.5, .3, .2); ppl 10 -> (12, 10, 9): d = (.2, 0, -.1); max_abs: delta = (1, 0, -.5)
    # alpha .5, w = 1: f = (1.5, 1, .75); r f = (.75, .3, .15), sum 1.2 -> (.625, .25, .125)
    cfg = AdaptiveConfig(topics=T3, alpha=0.5)
    d = adapt(cfg, step=100, ratios=[0.5, 0.3, 0.2], previous_ppl=[10, 10, 10], ppl=[12, 10, 9])
    assert d.change == approx([0.2, 0.0, -0.1])
    assert d.delta == approx([1.0, 0.0, -0.5])
    assert d.factors == approx([1.5, 1.0, 0.75])
    assert d.new_ratios == approx([0.625, 0.25, 0.125])
    assert d.unclamped_ratios == d.new_ratios and d.clamped == [] and d.reason == "adjusted"


def test_weights_and_sum_abs_by_hand():
    # d = (.2, 0, -.1); sum_abs: delta = (2/3, 0, -1/3); w = (2, 1, 1), alpha .3:
    # f = (1 + .3*2/3*2, 1, 1 - .3/3) = (1.4, 1, .9); r f = (.7, .3, .18), sum 1.18
    cfg = AdaptiveConfig(topics=T3, alpha=0.3, weights={"math": 2.0}, normalise="sum_abs")
    d = adapt(cfg, step=1, ratios=[0.5, 0.3, 0.2], previous_ppl=[10, 10, 10], ppl=[12, 10, 9])
    assert d.factors == approx([1.4, 1.0, 0.9])
    assert d.new_ratios == approx([0.7 / 1.18, 0.3 / 1.18, 0.18 / 1.18])
    assert d.weights == [2.0, 1.0, 1.0]


def test_clamp_keeps_proportions_of_the_free_topics():
    # (.625, .25, .125) with upper .6 on math: .6 + c (.25 + .125) = 1 -> c = 16/15
    cfg = AdaptiveConfig(topics=T3, alpha=0.5, upper={"math": 0.6})
    d = adapt(cfg, step=1, ratios=[0.5, 0.3, 0.2], previous_ppl=[10, 10, 10], ppl=[12, 10, 9])
    assert d.unclamped_ratios == approx([0.625, 0.25, 0.125])
    assert d.new_ratios == approx([0.6, 0.25 * 16 / 15, 0.125 * 16 / 15])
    assert d.clamped == ["math"]
    assert sum(d.new_ratios) == pytest.approx(1.0, abs=1e-15)


def test_clamp_both_sides():
    # r = (.7, .25, .05), lower .1 on history, upper .6 on math: physics is the only free one:
    # .6 + .25 c + .1 = 1 -> c = 1.2, physics .3
    out, held = clamp_ratios([0.7, 0.25, 0.05], [0.0, 0.0, 0.1], [0.6, 1.0, 1.0])
    assert out == approx([0.6, 0.3, 0.1]) and held == [0, 2]
    # a chain: clamping math up-side pushes history over its own upper bound too
    out, held = clamp_ratios([0.8, 0.1, 0.1], [0, 0, 0], [0.5, 1.0, 0.2])
    # .5 + .1c + min(.1c, .2) = 1 -> c = 3 gives .3 + .3 > .2 => history held at .2: .1c = .3
    assert out == approx([0.5, 0.3, 0.2]) and held == [0, 2]


def test_inside_bounds_is_untouched():
    out, held = clamp_ratios([0.2, 0.3, 0.5], [0.1] * 3, [0.9] * 3)
    assert out == [0.2, 0.3, 0.5] and held == []


def test_a_rising_topic_gains_share_over_several_points_and_state_round_trips():
    cfg = AdaptiveConfig(topics=T3, alpha=0.2, lower=0.05, upper=0.8)
    mix = AdaptiveMixture(cfg, [1, 1, 2])
    assert mix.ratios == approx([0.25, 0.25, 0.5])
    first = mix.observe(100, [8.0, 9.0, 7.0])
    assert first.reason == "baseline" and first.new_ratios == approx([0.25, 0.25, 0.5])
    decisions = []
    ppl = [8.0, 9.0, 7.0]
    for k in range(1, 6):
        ppl = [ppl[0] * 1.1, ppl[1] * 0.95, ppl[2]]  # math forgotten, physics learnt
        decisions.append(mix.observe(100 + 100 * k, ppl))
    shares = [d.new_ratios[0] for d in decisions]
    assert all(b > a for a, b in zip(shares, shares[1:]))          # math keeps rising
    assert all(d.new_ratios[1] < d.previous_ratios[1] for d in decisions)  # physics falls
    # the same decisions from a restored state (resume)
    mix2 = AdaptiveMixture(cfg, [1, 1, 2])
    mix2.observe(100, [8.0, 9.0, 7.0])
    ppl = [8.0, 9.0, 7.0]
    for k in range(1, 3):
        ppl = [ppl[0] * 1.1, ppl[1] * 0.95, ppl[2]]
        mix2.observe(100 + 100 * k, ppl)
    state = json.loads(json.dumps(mix2.state_dict()))
    mix3 = AdaptiveMixture(cfg, [1, 1, 2])
    mix3.load_state_dict(state)
    for k in range(3, 6):
        ppl = [ppl[0] * 1.1, ppl[1] * 0.95, ppl[2]]
        d = mix3.observe(100 + 100 * k, ppl)
        assert d.to_dict() == decisions[k - 1].to_dict()
    # decisions are plain JSON and round-trip
    again = MixtureDecision.from_dict(json.loads(json.dumps(decisions[-1].to_dict())))
    assert again == decisions[-1]


def test_no_change_keeps_ratios():
    cfg = AdaptiveConfig(topics=T3)
    d = adapt(cfg, step=5, ratios=[0.5, 0.3, 0.2], previous_ppl=[3, 4, 5], ppl=[3, 4, 5])
    assert d.reason == "no change" and d.new_ratios == approx([0.5, 0.3, 0.2])


def test_factor_floor_with_unnormalised_change():
    # normalise none, d = -0.9 for history, alpha 2: 1 - 1.8 < 0 -> floored at min_factor
    cfg = AdaptiveConfig(topics=T3, alpha=2.0, normalise="none", min_factor=0.01)
    d = adapt(cfg, step=1, ratios=[0.4, 0.4, 0.2], previous_ppl=[10, 10, 10], ppl=[10, 10, 1])
    assert d.factors == approx([1.0, 1.0, 0.01])
    assert d.new_ratios[2] == pytest.approx(0.002 / 0.802)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lower=0.5), "infeasible"),
    (dict(upper=0.2), "infeasible"),
    (dict(upper={"math": 0.1}, lower={"math": 0.2}), "bounds of math"),
    (dict(weights={"chemistry": 1}), "unknown topics"),
    (dict(normalise="softmax"), "normalise"),
    (dict(alpha=float("nan")), "alpha"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(AdaptiveMixtureError, match=match):
        AdaptiveConfig(topics=T3, **kwargs)


def test_bad_measurements_name_the_topic():
    mix = AdaptiveMixture(AdaptiveConfig(topics=T3), [1, 1, 1])
    with pytest.raises(AdaptiveMixtureError, match="ppl.physics"):
        mix.observe(1, [3.0, float("nan"), 2.0])
    with pytest.raises(AdaptiveMixtureError, match="3 topics"):
        mix.observe(1, [3.0, 2.0])
    mix.observe(10, [3.0, 3.0, 3.0])
    with pytest.raises(AdaptiveMixtureError, match="not after"):
        mix.observe(10, [3.0, 3.0, 3.0])
