"""Strategy settings: one frozen dataclass, parsed once at the edge (DESIGN 4, "config flows once").

The ServerApp fills :class:`StrategySettings` from its parsed run config
(``app.server_app.strategy_settings``); everything in ``strategies/`` reads only this object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STRATEGY_NAMES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "scaffold",
    "fedbn",
    "fedmedian",
    "fedtrimmedavg",
)

# Metrics where a smaller value is better; any other best-metric is "higher is better".
LOWER_IS_BETTER = frozenset({"loss", "hd95"})

# Server learning rate used when ``server_lr`` is 0 ("strategy default").
DEFAULT_SERVER_LR = {"fedadam": 1e-2, "fedyogi": 1e-2}


@dataclass(frozen=True)
class StrategySettings:
    """Everything a server strategy needs; validated on construction.

    ``server_lr`` 0 means the strategy default (1.0 for the averaging strategies, i.e. plain
    averaging; 1e-2 for fedadam/fedyogi, where it is the server optimizer's step size).
    ``max_update_norm``/``relative_update_norm`` 0 switch the norm bound off.
    ``cross_site_every`` 0 means cross-site evaluation only at the end of the run.
    """

    name: str = "fedavg"
    num_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_sites: int = 2
    min_train_sites: int = 1
    min_evaluate_sites: int = 1
    seed: int = 42
    local_epochs: int = 1
    lr: float = 1e-3
    proximal_mu: float = 0.0
    server_lr: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_fraction: float = 0.2
    max_update_norm: float = 0.0
    relative_update_norm: float = 0.0
    update_norm_action: str = "reject"
    best_metric: str = "dice"
    round_timeout_s: float = 24 * 3600.0
    resume_from: str = ""
    cross_site: bool = True
    cross_site_every: int = 0
    local_baselines: bool = False
    unseen_site: bool = False
    dp_required: bool = False

    def __post_init__(self) -> None:
        if self.name not in STRATEGY_NAMES:
            raise ValueError(
                f"strategy={self.name!r} is not known; choose one of {', '.join(STRATEGY_NAMES)}"
            )
        for field in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{_key(field)}={value} must be between 0 and 1")
        for field in ("num_rounds", "min_available_sites", "min_train_sites",
                      "min_evaluate_sites", "local_epochs", "cross_site_every"):
            if getattr(self, field) < 0:
                raise ValueError(f"{_key(field)}={getattr(self, field)} must be >= 0")
        for field in ("lr", "proximal_mu", "server_lr", "tau", "max_update_norm",
                      "relative_update_norm", "round_timeout_s"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{_key(field)}={value} must be a finite number >= 0")
        for field in ("beta_1", "beta_2"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{_key(field)}={value} must be in [0, 1)")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim-fraction={self.trim_fraction} must be in [0, 0.5)")
        if self.update_norm_action not in ("reject", "clip"):
            raise ValueError(
                f"update-norm-action={self.update_norm_action!r} must be 'reject' or 'clip'"
            )
        if not self.best_metric:
            raise ValueError("best-metric must name a metric, e.g. 'dice' or 'auc'")

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the strategy's default when it is 0."""
        if self.server_lr > 0.0:
            return self.server_lr
        return DEFAULT_SERVER_LR.get(self.name, 1.0)

    @property
    def higher_is_better(self) -> bool:
        """Direction of ``best_metric`` (loss and hd95 are lower-is-better)."""
        return self.best_metric not in LOWER_IS_BETTER


def _key(field: str) -> str:
    return field.replace("_", "-")
