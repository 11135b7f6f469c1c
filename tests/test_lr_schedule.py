import math

import pytest

from lr_schedule import WarmupThenDecay, scaled_learning_rate


def authors_schedule(decay="linear", boundaries=()):
    # 0.001 per 32 images, global batch 256 (8 nodes x 4 ranks x 8), 40 steps an epoch.
    peak = scaled_learning_rate(0.001, 256, 32)
    return WarmupThenDecay(0.001, peak, warmup_steps=5 * 40, total_steps=2000, end_lr=1e-4,
                           decay=decay, step_boundaries=boundaries)


def test_linear_rule_scales_with_the_global_batch():
    assert scaled_learning_rate(0.001, 256, 32) == pytest.approx(0.008)
    assert scaled_learning_rate(0.001, 4096, 32) == pytest.approx(0.128)
    assert scaled_learning_rate(0.001, 128, 32, "sqrt") == pytest.approx(0.002)
    assert scaled_learning_rate(0.001, 128, 32, "none") == pytest.approx(0.001)


def test_authors_recipe_values():
    schedule = authors_schedule()
    assert float(schedule(0)) == pytest.approx(0.001)
    assert float(schedule(100)) == pytest.approx(0.0045)
    assert float(schedule(200)) == pytest.approx(0.008)
    assert float(schedule(1100)) == pytest.approx((0.008 + 1e-4) / 2, rel=1e-5)
    assert float(schedule(2000)) == pytest.approx(1e-4, rel=1e-4)


def test_cosine_decay_ends_at_end_lr_and_passes_the_midpoint():
    schedule = authors_schedule("cosine")
    assert float(schedule(200)) == pytest.approx(0.008)
    assert float(schedule(1100)) == pytest.approx(1e-4 + (0.008 - 1e-4) / 2, rel=1e-5)
    assert float(schedule(2000)) == pytest.approx(1e-4, rel=1e-4)


def test_step_decay_divides_by_ten_at_each_boundary_down_to_end_lr():
    schedule = authors_schedule("step", boundaries=(1000, 1500, 1800))
    assert float(schedule(999)) == pytest.approx(0.008)
    assert float(schedule(1000)) == pytest.approx(0.0008)
    assert float(schedule(1500)) == pytest.approx(1e-4)  # 8e-5 floored at end_lr
    assert float(schedule(1999)) == pytest.approx(1e-4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="scaling rule"):
        scaled_learning_rate(0.1, 64, 32, "quadratic")
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupThenDecay(0.001, 0.008, 200, 200, 1e-4)
    with pytest.raises(ValueError, match="decay"):
        WarmupThenDecay(0.001, 0.008, 10, 200, 1e-4, decay="exponential")


def test_schedule_round_trips_through_its_config():
    schedule = authors_schedule("step", (1000,))
    clone = WarmupThenDecay.from_config(schedule.get_config())
    assert all(math.isclose(float(clone(s)), float(schedule(s))) for s in (0, 150, 1000, 2000))
