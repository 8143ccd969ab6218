"""Noise calibration: the smallest noise multiplier that makes a run end exactly at the budget.

Opacus' ``get_noise_multiplier`` assumes nothing was spent before. A site's ledger usually has
history (earlier rounds, earlier runs), so we bisect over the same Opacus accountant with
``history + [(sigma, q, planned_steps)]``: epsilon falls monotonically as sigma grows, and the
search (a bracketing regula falsi) always returns the in-budget end of its bracket, so the planned
steps land at (never above) the budget, within ``epsilon_tolerance`` below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.ledger import DEFAULT_MECHANISM, epsilon_of

MAX_NOISE_MULTIPLIER = 1e4
"""Beyond this the updates are pure noise: treat the budget as exhausted."""


class BudgetExhausted(RuntimeError):
    """The remaining privacy budget cannot pay for the planned steps at any useful noise level."""


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    history: Sequence[tuple[float, float, int]] = (),
    mechanism: str = DEFAULT_MECHANISM,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Sigma such that ``epsilon(history + steps at (sigma, q)) <= target_epsilon``, within tolerance.

    Raises BudgetExhausted when the history alone already reaches the target (or leaves so little
    that sigma would exceed MAX_NOISE_MULTIPLIER).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise ValueError(f"planned steps must be positive, got {steps}")
    history = [tuple(h) for h in history]
    spent = epsilon_of(history, delta, mechanism)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon {spent:.3f} already spent of {target_epsilon:.3f}"
        )

    def excess(log_sigma: float) -> tuple[float, float]:
        """(log(eps / target), eps) at sigma = exp(log_sigma); <= 0 means within budget."""
        value = epsilon_of(history + [(math.exp(log_sigma), sample_rate, steps)], delta, mechanism)
        return min(math.log(value / target_epsilon), 1e3), value  # clamp: eps may be inf

    # Bracket: lo over the budget, hi within it (epsilon falls as sigma grows).
    hi = math.log(0.5)
    y_hi, eps_hi = excess(hi)
    lo, y_lo = hi, y_hi
    while y_hi > 0:
        lo, y_lo = hi, y_hi
        hi += math.log(2.0)
        if hi > math.log(MAX_NOISE_MULTIPLIER):
            raise BudgetExhausted(
                f"privacy budget too small: epsilon {target_epsilon - spent:.4f} of {target_epsilon:.3f} "
                f"left cannot pay for {steps} more steps at any noise multiplier up to {MAX_NOISE_MULTIPLIER:g}"
            )
        y_hi, eps_hi = excess(hi)
    while y_lo <= 0:
        if lo < math.log(1e-3):
            return math.exp(hi)  # a vast budget: almost no noise needed
        hi, y_hi, eps_hi = lo, y_lo, excess(lo)[1]
        lo -= math.log(2.0)
        y_lo, _ = excess(lo)
    # Illinois regula falsi on log(eps) vs log(sigma): keeps the bracket, converges in a few steps.
    side = 0
    for _ in range(100):
        if target_epsilon - eps_hi <= epsilon_tolerance or hi - lo < 1e-9:
            break
        x = (lo * y_hi - hi * y_lo) / (y_hi - y_lo)
        y, eps_x = excess(x)
        if y <= 0:
            hi, y_hi, eps_hi = x, y, eps_x
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
