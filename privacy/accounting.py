"""Epsilon of a DP-SGD history, exactly as Opacus' RDP accountant computes it.

One place for the arithmetic the ledger, the noise calibration and central DP share. A history is
a list of ``(noise_multiplier, sample_rate, steps)``; RDP composes by adding, so the epsilon of
everything a case ever went through is the epsilon of the concatenation of those histories.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

DEFAULT_MECHANISM = "rdp"
"""Opacus RDP accountant: composes any heterogeneous history exactly, is deterministic and never
fails on extreme parameters (PRV is slightly tighter but numerically fragile on mixed histories)."""

History = Sequence[tuple[float, float, int]]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one step at the accountant's default orders (the slow part: cached)."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.setflags(write=False)
    return rdp


def epsilon_of(history: History, delta: float, mechanism: str = DEFAULT_MECHANISM) -> float:
    """Epsilon of an accountant history at ``delta``, as Opacus' accountant computes it.

    For RDP this is exactly ``RDPAccountant.get_privacy_spent`` (same orders, same functions; RDP
    is linear in the steps), with the per-step RDP of each (sigma, q) cached, since calibration
    evaluates many histories that share a prefix.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = [h for h in history if int(h[2]) > 0]
    if not history:
        return 0.0
    if mechanism == "rdp":
        rdp = sum(_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in history)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for tiny epsilons
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))


def worst_epsilon(histories: Sequence[History], delta: float, mechanism: str = DEFAULT_MECHANISM) -> float:
    """The largest epsilon over several cases' histories (0.0 for none): what a training set costs."""
    return max((epsilon_of(h, delta, mechanism) for h in histories), default=0.0)
