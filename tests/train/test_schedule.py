import math

import pytest

from latentforge.train.config import OptimConfig, TrainConfigError
from latentforge.train.schedule import LRSchedule


def naive_wsd(step, total, warmup, decay, peak, low):
    """SPEC section 6 written out directly: warmup, plateau, then 1 - sqrt over the last `decay` updates."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < total - decay:
        return peak
    progress = (step - (total - decay) + 1) / decay
    return low + (peak - low) * (1 - math.sqrt(progress))


def test_wsd_matches_spec_formula_and_phases():
    cfg = OptimConfig(lr=4.5e-4, min_lr=4.5e-6, schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    sched = LRSchedule(cfg, total_steps=100)
    rates = [sched.lr_at(s) for s in range(100)]
    for s, r in enumerate(rates):
        assert r == pytest.approx(naive_wsd(s, 100, 10, 20, 4.5e-4, 4.5e-6), rel=1e-12)
    assert rates[0] == pytest.approx(4.5e-5)  # warmup starts above zero: the first update moves the weights
    assert rates[9] == rates[10] == rates[79] == 4.5e-4  # warmup ends at the peak, plateau until the decay
    assert rates[99] == pytest.approx(4.5e-6)  # the last update uses min_lr
    # 1 - sqrt drops fastest at the start of the decay
    assert (rates[80] - rates[81]) < (rates[79] - rates[80]) + 1e-12
    assert rates[79] - rates[80] > rates[97] - rates[98]


def test_wsd_decay_steps_overrides_fraction():
    sched = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, decay_steps=4, decay_fraction=0.5), total_steps=10)
    assert [sched.lr_at(s) for s in range(6)] == [1.0] * 6
    assert sched.lr_at(6) == pytest.approx(1 - math.sqrt(0.25))
    assert sched.lr_at(9) == 0.0


def test_cosine_and_constant():
    cos = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=2), total_steps=12)
    assert cos.lr_at(0) == 0.5 and cos.lr_at(1) == 1.0
    assert cos.lr_at(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert cos.lr_at(11) == pytest.approx(0.1)
    const = LRSchedule(OptimConfig(lr=2.0, min_lr=0.0, schedule="constant", warmup_steps=4), total_steps=10)
    assert [const.lr_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_bad_schedule_values_name_the_field():
    with pytest.raises(TrainConfigError, match="optim.schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(TrainConfigError, match="optim.min_lr"):
        OptimConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(TrainConfigError, match="unknown optim config key"):
        OptimConfig.from_dict({"learning_rate": 1e-3})
