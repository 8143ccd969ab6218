"""A site's DP settings and budget rules: the lifetime budget, a study's share, refusal codes.

The node config's ``dp-epsilon`` is the site's lifetime budget per patient (over all studies);
a study asks for its share with run config ``dp-study-epsilon`` and gets at most that, capped
by the lifetime budget (and, in :class:`privacy.session.DPSiteSession`, by what the worst-off
training case has left).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.accounting import DEFAULT_MECHANISM
from privacy.ledger import default_delta

GRAD_SAMPLE_MODES = ("functorch", "hooks", "ew")
DEFAULT_GRAD_SAMPLE_MODE = "functorch"
"""Fastest correct Opacus mode for 3D conv nets on CPU (see bench/privacy_speed.py)."""
EPSILON_SLACK = 0.011
"""A budget with less than this left counts as spent (calibration stops within 0.01 of a target)."""
DEFAULT_STUDY_FRACTION = 0.25
"""A study that asks for no share (run config ``dp-study-epsilon`` 0) gets this fraction of the
site's lifetime budget, so a smoke test can never use a site up."""
REFUSAL_CODES = {
    "privacy-budget-exhausted": "a training case has spent the site's lifetime epsilon",
    "privacy-study-share-spent": "this study has spent its epsilon share",
    "privacy-budget-too-small": "what is left would need more noise than is useful",
    "privacy-ledger-error": "the site's ledger is missing, damaged or foreign: the spend is unknown",
    "privacy-bad-study-epsilon": "the study asked for an epsilon share that is not a number >= 0",
}
"""What a DP site replies (``refused-reason``) when it declines to train; the detail stays in its log."""


def study_share(asked: float | None, lifetime: float) -> float:
    """The epsilon a study may spend at a site: what it asked for, capped by the lifetime budget."""
    if asked is None or asked == 0:
        return DEFAULT_STUDY_FRACTION * lifetime
    if not (isinstance(asked, (int, float)) and math.isfinite(asked) and asked > 0):
        raise ValueError(f"dp-study-epsilon must be a positive number (or 0 for the default), got {asked!r}")
    return min(float(asked), lifetime)


def default_state_dir(data_path: str | os.PathLike) -> Path:
    """Site-private state folder when ``state-dir`` is not set: ``<data-path>/private/state``."""
    return Path(data_path) / "private" / "state"


@dataclass(frozen=True)
class DPSettings:
    """A site's DP settings (node config ``dp-epsilon``, ``dp-delta``, ``dp-max-grad-norm``)."""

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE
    mechanism: str = DEFAULT_MECHANISM
    max_noise_multiplier: float = 10.0
    """Refuse to train when the remaining budget needs more noise than this: such updates are
    nearly pure noise and would only drag the federated average down."""

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"dp-epsilon must be a positive number, got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            raise ValueError(f"dp-max-grad-norm must be positive, got {self.max_grad_norm!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], num_training_cases: int) -> DPSettings | None:
        """Settings from a site's node config; None when ``dp-epsilon`` is absent or empty (no DP).

        ``dp-delta`` defaults to ``min(1e-5, 1/(10 N))`` for N training cases; a configured delta
        that is not below 1/N is rejected (it would allow leaking a whole case).
        """
        raw_eps = node_config.get("dp-epsilon")
        if raw_eps in (None, ""):
            return None

        def number(key: str, value: Any) -> float:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(f"node config {key} must be a number, got {value!r}") from None

        eps = number("dp-epsilon", raw_eps)
        raw_delta = node_config.get("dp-delta")
        delta = default_delta(num_training_cases) if raw_delta in (None, "") else number("dp-delta", raw_delta)
        if delta >= 1.0 / num_training_cases:
            raise ValueError(
                f"node config dp-delta={delta} must be below 1/N = {1.0 / num_training_cases:.3g} "
                f"(N = {num_training_cases} training cases); leave it unset for min(1e-5, 1/(10N))"
            )
        raw_clip = node_config.get("dp-max-grad-norm")
        clip = 1.0 if raw_clip in (None, "") else number("dp-max-grad-norm", raw_clip)
        return cls(epsilon=eps, delta=delta, max_grad_norm=clip)
