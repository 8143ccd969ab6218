"""Server-side strategies of fedimaging (Flower Message API; never imports monai, tasks or app).

The ServerApp needs two calls::

    settings = app.config.strategy_settings(run, best_metric, min_sites)   # derived from the run config
    strategy = build_strategy(settings, RunDirectory(run_dir), local_param_names)
    result = strategy.run(grid, initial_arrays, evaluate_config=...)   # resume, rounds, checkpoints, cross-site

Layout (imports go downwards only): this registry -> the variants (fedprox, fedopt, scaffold, fedbn,
robust) and central_dp (a wrapper) -> base (Flower interface + hooks) -> run_loop (run, resume,
finish) -> cross_site / server_state -> screening, sampling, extension -> records, validation,
aggregation, metrics, run_dir, settings (pure functions and data).
"""

from __future__ import annotations

from . import central_dp, secure_aggregation
from .base import FedImagingFedAvg
from .fedbn import FedImagingFedBN
from .fedopt import FedImagingFedAdam, FedImagingFedYogi
from .fedprox import FedImagingFedProx
from .records import SiteUpdate
from .robust import FedImagingFedMedian, FedImagingFedTrimmedAvg
from .run_dir import RunDirectory, load_weights, save_weights
from .run_loop import NoSiteTrained
from .scaffold import FedImagingScaffold
from .settings import StrategySettings

FedImagingStrategy = FedImagingFedAvg

# The one list of strategy names (run config ``strategy``).
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
STRATEGY_NAMES = tuple(STRATEGIES)


def build_strategy(
    settings: StrategySettings,
    run_dir: RunDirectory,
    local_param_names: frozenset[str] = frozenset(),
    frozen_param_names: frozenset[str] = frozenset(),
) -> FedImagingStrategy:
    """The strategy named by ``settings.strategy``; ``local_param_names`` only matter for FedBN,
    ``frozen_param_names`` (run config ``freeze``) are sent to the sites but never come back."""
    cls = STRATEGIES[settings.strategy]
    strategy = cls(settings, run_dir, frozenset(local_param_names) if settings.strategy == "fedbn" else frozenset(),
                   frozen_param_names=frozenset(frozen_param_names))
    if settings.central_dp != "off":
        central_dp.wrap(strategy)  # Flower's DP wrapper drives the rounds
    if settings.secure_aggregation == "he":
        secure_aggregation.wrap(strategy)  # ciphertext sum instead of plaintext updates
    return strategy


__all__ = [
    "STRATEGIES",
    "STRATEGY_NAMES",
    "FedImagingFedAdam",
    "FedImagingFedAvg",
    "FedImagingFedBN",
    "FedImagingFedMedian",
    "FedImagingFedProx",
    "FedImagingFedTrimmedAvg",
    "FedImagingFedYogi",
    "FedImagingScaffold",
    "FedImagingStrategy",
    "NoSiteTrained",
    "RunDirectory",
    "SiteUpdate",
    "StrategySettings",
    "build_strategy",
    "load_weights",
    "save_weights",
]
