"""Calibrated noise makes the planned steps land at (not above) the remaining budget."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privacy.calibrate import BudgetExhausted, calibrate_noise_multiplier, planned_steps

DELTA = 1e-5


def eps_of(history):
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize(
    "target,q,steps,history",
    [
        (8.0, 0.2, 120, []),
        (3.0, 0.25, 40, []),
        (8.0, 0.2, 120, [(3.0, 0.25, 60)]),
        (10.0, 0.05, 500, [(2.0, 0.1, 100), (0.9, 0.2, 10)]),
    ],
)
def test_planned_steps_land_at_the_budget(target, q, steps, history):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, history=history)
    reached = eps_of(history + [(sigma, q, steps)])
    assert reached <= target
    assert reached >= target - 0.011
    # any clearly smaller noise would overshoot: sigma is (nearly) the smallest that fits
    assert eps_of(history + [(sigma * 0.98, q, steps)]) > target


def test_agrees_with_opacus_get_noise_multiplier_without_history():
    ours = calibrate_noise_multiplier(target_epsilon=5.0, delta=DELTA, sample_rate=0.2, steps=200)
    theirs = get_noise_multiplier(target_epsilon=5.0, target_delta=DELTA, sample_rate=0.2, steps=200,
                                  accountant="rdp")
    assert ours == pytest.approx(theirs, rel=0.01)


def test_history_means_more_noise():
    fresh = calibrate_noise_multiplier(target_epsilon=8.0, delta=DELTA, sample_rate=0.2, steps=100)
    used = calibrate_noise_multiplier(target_epsilon=8.0, delta=DELTA, sample_rate=0.2, steps=100,
                                      history=[(3.0, 0.2, 100)])
    assert used > fresh


def test_exhausted_budget_raises():
    history = [(0.8, 0.25, 200)]
    assert eps_of(history) > 4.0
    with pytest.raises(BudgetExhausted, match="exhausted"):
        calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA, sample_rate=0.2, steps=10, history=history)


def test_planned_steps_and_bad_values():
    assert planned_steps(12, 2, 5) == 120
    with pytest.raises(ValueError):
        planned_steps(0, 2, 5)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=-1, delta=DELTA, sample_rate=0.2, steps=10)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=1, delta=DELTA, sample_rate=1.5, steps=10)
