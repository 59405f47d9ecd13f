"""LR schedules against their formulas at chosen steps."""

import math

import pytest

from megasyne.training.schedule import ScheduleConfig, lr_at

PEAK, MIN, TOTAL = 1e-3, 1e-4, 100


def lr(step, **kw):
    return lr_at(step, peak_lr=PEAK, min_lr=MIN, total_steps=TOTAL, schedule=ScheduleConfig(**kw))


def test_warmup_is_linear_to_peak():
    assert lr(0, warmup_steps=10) == pytest.approx(PEAK / 10)
    assert lr(4, warmup_steps=10) == pytest.approx(PEAK * 5 / 10)
    assert lr(9, warmup_steps=10) == pytest.approx(PEAK)


@pytest.mark.parametrize("shape, at_half", [
    ("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_stable_then_decay(shape, at_half):
    kw = dict(kind="wsd", warmup_steps=10, decay_steps=20, decay_shape=shape)
    assert lr(10, **kw) == PEAK and lr(79, **kw) == PEAK        # stable phase
    assert lr(80, **kw) == pytest.approx(PEAK)                  # decay starts at 100-20
    assert lr(90, **kw) == pytest.approx(MIN + (PEAK - MIN) * at_half)
    assert lr(100, **kw) == pytest.approx(MIN)                  # end of decay
    assert lr(200, **kw) == pytest.approx(MIN)                  # and stays there


def test_wsd_default_decay_is_last_10_percent():
    assert lr(89, kind="wsd") == PEAK
    assert lr(95, kind="wsd") == pytest.approx(MIN + (PEAK - MIN) * 0.5)


def test_cosine():
    kw = dict(kind="cosine", warmup_steps=10)
    assert lr(10, **kw) == pytest.approx(PEAK)
    assert lr(55, **kw) == pytest.approx(MIN + (PEAK - MIN) * 0.5)
    assert lr(100, **kw) == pytest.approx(MIN)


def test_bad_schedule_names_the_field():
    with pytest.raises(ValueError, match="schedule.decay_shape"):
        ScheduleConfig(decay_shape="exp")
    with pytest.raises(ValueError, match="schedule.kind"):
        ScheduleConfig(kind="step")
