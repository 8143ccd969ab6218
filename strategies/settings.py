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

# Central (user-level) DP modes: Flower's fixed-clipping wrappers (see strategies.central_dp).
CENTRAL_DP_MODES = ("off", "server-side", "client-side")
# Strategies whose aggregate is a plain mean of the sites' models, the quantity the wrappers'
# noise is calibrated for (median, trimmed mean, a server optimizer, SCAFFOLD's extra arrays
# and FedBN's site-local layers are not).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")

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
    evaluate_every: int = 1  # the global model's evaluate phase every N rounds and the last (0: last only)
    local_baselines: bool = False
    unseen_site: bool = False
    dp_required: bool = False
    central_dp: str = "off"
    central_dp_noise_multiplier: float = 1.0
    central_dp_clipping_norm: float = 1.0
    central_dp_delta: float = 1e-5
    central_dp_sites: int = 0

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
                      "min_evaluate_sites", "local_epochs", "cross_site_every", "evaluate_every"):
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
        self._check_central_dp()
        if not self.best_metric:
            raise ValueError("best-metric must name a metric, e.g. 'dice' or 'auc'")

    def _check_central_dp(self) -> None:
        if self.central_dp not in CENTRAL_DP_MODES:
            raise ValueError(f"central-dp={self.central_dp!r} must be one of {', '.join(CENTRAL_DP_MODES)}")
        if self.central_dp == "off":
            return
        if self.name not in CENTRAL_DP_STRATEGIES:
            raise ValueError(
                f"central-dp={self.central_dp!r} needs strategy fedavg or fedprox, not {self.name!r}: "
                "the noise is calibrated for a plain mean of clipped updates"
            )
        if self.effective_server_lr != 1.0:
            raise ValueError(f"central-dp needs server-lr 0 or 1 (plain averaging), got {self.server_lr}")
        z, c, d = self.central_dp_noise_multiplier, self.central_dp_clipping_norm, self.central_dp_delta
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"central-dp-noise-multiplier={z} must be > 0 (no noise is no privacy)")
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"central-dp-clipping-norm={c} must be > 0")
        if not 0 < d < 1:
            raise ValueError(f"central-dp-delta={d} must be in (0, 1)")
        if self.central_dp_sites < 0:
            raise ValueError(f"central-dp-sites={self.central_dp_sites} must be >= 0")

    @property
    def central_dp_denominator(self) -> int:
        """Sites per round the noise is calibrated for (DP-FedAvg's fixed denominator).

        ``central-dp-sites``, else what the sampler picks from ``min-available-sites`` sites.
        """
        if self.central_dp_sites:
            return self.central_dp_sites
        population = max(1, self.min_available_sites)
        return min(population, max(int(population * self.fraction_train), self.min_train_sites, 1))

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
