"""Strategy settings: the strategies' frozen view of the run configuration.

The ServerApp derives :class:`StrategySettings` from its parsed run config by field name
(``app.config.strategy_settings``): the defaults and the validation live there, once, so this
class has neither. Fields carry the run-config key's name (``strategy`` is ``strategy``,
``num_server_rounds`` is ``num-server-rounds``); the few that are not run-config keys
(``min_available_sites`` etc., ``best_metric``, ``unseen_site``) are derived by the ServerApp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Metrics where a smaller value is better; any other best-metric is "higher is better".
LOWER_IS_BETTER = frozenset({"loss", "hd95"})

# Learning-rate schedules over the run: the server decides each round's site learning rate.
LR_SCHEDULES = ("cosine", "constant")

# Server learning rate used when ``server_lr`` is 0 ("strategy default").
DEFAULT_SERVER_LR = {"fedadam": 1e-2, "fedyogi": 1e-2}


def scheduled_lr(lr: float, schedule: str, num_rounds: int, server_round: int) -> float:
    """``lr`` in ``server_round`` of ``num_rounds`` under ``schedule``: cosine decays to 10% at the last round.

    A function of its own so that the benchmarks' centralised arms follow the sites' schedule."""
    if schedule == "constant" or num_rounds <= 1 or server_round < 1:
        return lr
    progress = min(1.0, (server_round - 1) / (num_rounds - 1))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True, kw_only=True)
class StrategySettings:
    """Everything a server strategy needs (see the README's run configuration for each key).

    ``server_lr`` 0 means the strategy default (1.0 for the averaging strategies, i.e. plain
    averaging; 1e-2 for fedadam/fedyogi, where it is the server optimizer's step size).
    ``max_update_norm``/``relative_update_norm`` 0 switch the norm bound off.
    ``cross_site_every`` 0 means cross-site evaluation only at the end of the run.
    """

    strategy: str
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_available_sites: int
    min_train_sites: int
    min_evaluate_sites: int
    seed: int
    local_epochs: int
    lr: float
    lr_schedule: str
    proximal_mu: float
    server_lr: float
    beta_1: float
    beta_2: float
    tau: float
    trim_fraction: float
    max_update_norm: float
    relative_update_norm: float
    update_norm_action: str
    best_metric: str
    round_timeout_s: float
    resume_from: str
    cross_site: bool
    cross_site_every: int
    evaluate_every: int = 1  # the global model's evaluate phase every N rounds and after the last (0: last only)
    local_baselines: bool
    unseen_site: bool
    dp_required: bool
    central_dp: str
    central_dp_noise_multiplier: float
    central_dp_clipping_norm: float
    central_dp_delta: float
    central_dp_sites: int
    secure_aggregation: str
    he_public_context: str

    def round_lr(self, server_round: int) -> float:
        """The sites' learning rate in ``server_round``: ``lr`` decayed over the run (cosine, to 10%).

        Round 0 (local baselines) and ``lr-schedule=constant`` get ``lr`` itself.
        """
        return scheduled_lr(self.lr, self.lr_schedule, self.num_server_rounds, server_round)

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the strategy's default when it is 0."""
        if self.server_lr > 0.0:
            return self.server_lr
        return DEFAULT_SERVER_LR.get(self.strategy, 1.0)

    @property
    def higher_is_better(self) -> bool:
        """Direction of ``best_metric`` (loss and hd95 are lower-is-better)."""
        return self.best_metric not in LOWER_IS_BETTER
