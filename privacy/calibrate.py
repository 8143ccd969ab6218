"""Noise calibration: the smallest noise multiplier that makes a study end exactly at its budget.

Opacus' ``get_noise_multiplier`` assumes nothing was spent before and one budget. A site has
several constraints: every training case's history (earlier studies) against the lifetime
budget, and the study's own history against its share. We search over the same Opacus
accountant with ``history + [(sigma, q, planned_steps)]`` for each constraint: each epsilon falls
monotonically as sigma grows, so does their worst ratio to its target, and the search (a
bracketing regula falsi) always returns the in-budget end of its bracket, so the planned steps
land at (never above) the binding target, within ``epsilon_tolerance`` below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.accounting import DEFAULT_MECHANISM, epsilon_of

MAX_NOISE_MULTIPLIER = 1e4
"""Beyond this the updates are pure noise: treat the budget as exhausted."""


class BudgetExhausted(RuntimeError):
    """The remaining privacy budget cannot pay for the planned steps at any useful noise level."""


def calibrate_noise_multiplier(
    *,
    target_epsilon: float | None = None,
    delta: float,
    sample_rate: float,
    steps: int,
    history: Sequence[tuple[float, float, int]] = (),
    constraints: Sequence[tuple[Sequence[tuple[float, float, int]], float]] = (),
    mechanism: str = DEFAULT_MECHANISM,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest sigma (within tolerance) with ``epsilon(h + steps at (sigma, q)) <= target`` for every constraint.

    ``constraints`` are ``(history, target)`` pairs, e.g. each case's history against the site's
    lifetime budget and the study's own history against its share; ``target_epsilon`` with
    ``history`` is one more. Raises BudgetExhausted when a history alone already reaches its
    target (or leaves so little that sigma would exceed MAX_NOISE_MULTIPLIER).
    """
    pairs = [([tuple(h) for h in hist], float(target)) for hist, target in constraints]
    if target_epsilon is not None:
        pairs.append(([tuple(h) for h in history], float(target_epsilon)))
    if not pairs:
        raise ValueError("give target_epsilon or constraints")
    for _, target in pairs:
        if not target > 0:
            raise ValueError(f"target epsilon must be positive, got {target}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise ValueError(f"planned steps must be positive, got {steps}")
    for hist, target in pairs:
        spent = epsilon_of(hist, delta, mechanism)
        if spent >= target:
            raise BudgetExhausted(f"privacy budget exhausted: epsilon {spent:.3f} already spent of {target:.3f}")
    tightest = min(t for _, t in pairs)

    def excess(log_sigma: float) -> tuple[float, float]:
        """(max log(eps / target), min slack target - eps) at sigma = exp(log_sigma); <= 0 is within budget."""
        extra = (math.exp(log_sigma), sample_rate, steps)
        worst, slack = -math.inf, math.inf
        for hist, target in pairs:
            value = epsilon_of(hist + [extra], delta, mechanism)
            worst = max(worst, min(math.log(value / target), 1e3) if value > 0 else -1e3)  # clamp: eps may be inf
            slack = min(slack, target - value)
        return worst, slack

    # Bracket: lo over the budget, hi within it (epsilon falls as sigma grows).
    hi = math.log(0.5)
    y_hi, slack_hi = excess(hi)
    lo, y_lo = hi, y_hi
    while y_hi > 0:
        lo, y_lo = hi, y_hi
        hi += math.log(2.0)
        if hi > math.log(MAX_NOISE_MULTIPLIER):
            raise BudgetExhausted(
                f"privacy budget too small: the epsilon left (tightest target {tightest:.3f}) cannot pay "
                f"for {steps} more steps at any noise multiplier up to {MAX_NOISE_MULTIPLIER:g}"
            )
        y_hi, slack_hi = excess(hi)
    while y_lo <= 0:
        if lo < math.log(1e-3):
            return math.exp(hi)  # a vast budget: almost no noise needed
        hi, y_hi, slack_hi = lo, y_lo, excess(lo)[1]
        lo -= math.log(2.0)
        y_lo, _ = excess(lo)
    # Illinois regula falsi on log(eps) vs log(sigma): keeps the bracket, converges in a few steps.
    side = 0
    for _ in range(100):
        if slack_hi <= epsilon_tolerance or hi - lo < 1e-9:
            break
        x = (lo * y_hi - hi * y_lo) / (y_hi - y_lo)
        y, slack_x = excess(x)
        if y <= 0:
            hi, y_hi, slack_hi = x, y, slack_x
            if side == -1:
                y_lo /= 2
            side = -1
        else:
            lo, y_lo = x, y
            if side == 1:
                y_hi /= 2
            side = 1
    return math.exp(hi)


def planned_steps(rounds: int, local_epochs: int, steps_per_epoch: int) -> int:
    """Steps a run will take if this site trains in every round: rounds x epochs x steps/epoch."""
    for name, value in (("rounds", rounds), ("local_epochs", local_epochs), ("steps_per_epoch", steps_per_epoch)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return rounds * local_epochs * steps_per_epoch
