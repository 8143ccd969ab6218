"""Per-site metric handling: case-weighted aggregation and JSON-safe conversion (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

WEIGHT_KEY = "num-examples"
# Keys that describe the reply rather than the model; never averaged.
NOT_AVERAGED = frozenset({WEIGHT_KEY, "refused"})
# Privacy spend is per site: report the worst site next to the weighted mean.
MAX_ALSO = ("dp-epsilon-spent",)


def to_plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """MetricRecord/ConfigRecord -> plain dict of JSON-able numbers (non-finite -> None)."""
    return {str(k): _plain(v) for k, v in metrics.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


RECEIVED = "received-"  # train-reply metrics of the model a site received (run config evaluate-received)


def received_model_mean(site_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``received-*`` metrics averaged like an evaluate phase: weighted by the sites' test cases.

    ``weighted_site_mean`` weights train replies by training cases; these metrics were measured on
    test cases (``received-num-examples``), so they get the evaluate phase's weights instead.
    """
    as_evaluate = {
        site: {WEIGHT_KEY: m.get(f"{RECEIVED}{WEIGHT_KEY}", 0),
               **{k[len(RECEIVED):]: v for k, v in m.items() if k.startswith(RECEIVED) and k != f"{RECEIVED}{WEIGHT_KEY}"}}
        for site, m in site_metrics.items()
    }
    return {f"{RECEIVED}{k}": v for k, v in weighted_site_mean(as_evaluate).items()}


def weighted_site_mean(site_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Case-weighted mean of every scalar metric over the sites that report a finite value for it.

    ``num-examples`` is the weight (kept per site, not aggregated). Sites with zero cases do not
    count. ``dp-epsilon-spent`` also gets ``dp-epsilon-spent-max``. Keys sorted for stable output.
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for site in sorted(site_metrics):
        metrics = site_metrics[site]
        weight = metrics.get(WEIGHT_KEY)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            continue
        weight = float(weight)
        if not math.isfinite(weight) or weight <= 0:
            continue
        for key, value in metrics.items():
            if key in NOT_AVERAGED or isinstance(value, (list, bool)) or value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            totals[key] = totals.get(key, 0.0) + weight
            if key in MAX_ALSO:
                maxima[key] = max(maxima.get(key, -math.inf), value)
    out = {key: sums[key] / totals[key] for key in sorted(sums)}
    for key, value in sorted(maxima.items()):
        out[f"{key}-max"] = value
    return out
