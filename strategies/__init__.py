"""Server-side strategies of fedimaging (Flower Message API; never imports monai or tasks).

The ServerApp needs two calls::

    settings = StrategySettings(name=..., num_rounds=..., ...)       # app.server_app.strategy_settings
    strategy = build_strategy(settings, RunDirectory(run_dir), local_param_names)
    result = strategy.run(grid, initial_arrays, train_config=..., evaluate_config=...,
                          evaluate_fn=None)   # resume, rounds, checkpoints, cross-site eval
"""

from __future__ import annotations

from . import central_dp, secure_aggregation
from .base import FedImagingFedAvg, SiteUpdate
from .fedbn import FedImagingFedBN
from .fedopt import FedImagingFedAdam, FedImagingFedYogi
from .fedprox import FedImagingFedProx
from .robust import FedImagingFedMedian, FedImagingFedTrimmedAvg
from .run_dir import RunDirectory, load_weights, save_weights
from .scaffold import FedImagingScaffold
from .settings import STRATEGY_NAMES, StrategySettings

FedImagingStrategy = FedImagingFedAvg

STRATEGIES: dict[str, type[FedImagingFedAvg]] = {
    "fedavg": FedImagingFedAvg,
    "fedprox": FedImagingFedProx,
    "fedadam": FedImagingFedAdam,
    "fedyogi": FedImagingFedYogi,
    "scaffold": FedImagingScaffold,
    "fedbn": FedImagingFedBN,
    "fedmedian": FedImagingFedMedian,
    "fedtrimmedavg": FedImagingFedTrimmedAvg,
}
assert set(STRATEGIES) == set(STRATEGY_NAMES)


def build_strategy(
    settings: StrategySettings,
    run_dir: RunDirectory,
    local_param_names: frozenset[str] = frozenset(),
) -> FedImagingStrategy:
    """The strategy named by ``settings.name``; ``local_param_names`` only matter for FedBN."""
    cls = STRATEGIES[settings.name]
    if settings.secure_aggregation == "he":  # ciphertext sum instead of plaintext updates
        cls = secure_aggregation.secure_variant(cls)
    strategy = cls(settings, run_dir, frozenset(local_param_names) if settings.name == "fedbn" else frozenset())
    if settings.central_dp != "off":
        strategy.driver = central_dp.wrap(strategy)  # Flower's DP wrapper drives the rounds
    return strategy


__all__ = [
    "STRATEGIES",
    "FedImagingFedAdam",
    "FedImagingFedAvg",
    "FedImagingFedBN",
    "FedImagingFedMedian",
    "FedImagingFedProx",
    "FedImagingFedTrimmedAvg",
    "FedImagingFedYogi",
    "FedImagingScaffold",
    "FedImagingStrategy",
    "RunDirectory",
    "SiteUpdate",
    "StrategySettings",
    "build_strategy",
    "load_weights",
    "save_weights",
]
