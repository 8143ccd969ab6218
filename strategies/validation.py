"""Reply validation as pure functions: each returns a reason string (excluded) or None (accepted).

Flower's own ``validate_message_reply_consistency`` raises and kills the round on one bad reply;
fedimaging instead excludes the bad reply with a reason recorded in ``metrics.jsonl`` and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .aggregation import update_norm

MAX_REASON_CHARS = 300


def short(reason: str) -> str:
    """Reasons are logged and stored; keep them to one short line."""
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def check_num_examples(metrics: Mapping[str, Any] | None) -> str | None:
    """The case count must be a finite number >= 0 (it is the aggregation weight)."""
    if metrics is None:
        return "reply has no 'metrics' MetricRecord"
    if "num-examples" not in metrics:
        return "metrics lack 'num-examples'"
    value = metrics["num-examples"]
    if isinstance(value, list) or isinstance(value, bool):
        return "'num-examples' must be a single number"
    if not math.isfinite(float(value)) or float(value) < 0:
        return f"'num-examples'={value} is not a finite number >= 0"
    return None


def check_arrays(
    sent: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    what: str = "arrays",
    allow_missing: bool = False,
) -> str | None:
    """``received`` must have exactly the keys (a subset with ``allow_missing``), shapes and
    dtypes of ``sent``, and finite values."""
    missing = [k for k in sent if k not in received]
    if missing and not allow_missing:
        return f"{what}: missing keys {_few(missing)}"
    extra = [k for k in received if k not in sent]
    if extra:
        return f"{what}: unexpected keys {_few(extra)}"
    for key, ref in sent.items():
        if key not in received:
            continue
        got = np.asarray(received[key])
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            return f"{what}: '{key}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{what}: '{key}' has dtype {got.dtype}, expected {ref.dtype}"
        if np.issubdtype(got.dtype, np.inexact) and not np.all(np.isfinite(got)):
            return f"{what}: '{key}' has non-finite values"
    return None


def is_refusal(metrics: Mapping[str, Any] | None) -> bool:
    """A site that refuses (e.g. privacy budget exhausted) replies with ``refused`` = 1."""
    return bool(metrics is not None and metrics.get("refused", 0) == 1)


def is_permanent_refusal(reason: str) -> bool:
    """Privacy-budget refusals do not go away: such sites are no longer sampled for training."""
    text = reason.lower()
    return any(word in text for word in ("privacy", "budget", "epsilon"))


def norm_bound_decisions(
    norms: Mapping[str, float],
    *,
    max_update_norm: float,
    relative_update_norm: float,
) -> dict[str, float]:
    """Sites whose update norm exceeds the bound, mapped to the bound they exceed.

    The bound is the smaller of ``max_update_norm`` (absolute; 0 = off) and
    ``relative_update_norm * median(norms)`` (0 = off). The relative bound needs at least three
    updates, otherwise the median is dominated by the outlier itself and it is not applied.
    """
    bounds = []
    if max_update_norm > 0:
        bounds.append(max_update_norm)
    if relative_update_norm > 0 and len(norms) >= 3:
        bounds.append(relative_update_norm * float(np.median(list(norms.values()))))
    if not bounds:
        return {}
    bound = min(bounds)
    return {site: bound for site, norm in norms.items() if norm > bound}


def compute_norms(
    sent: Mapping[str, np.ndarray], updates: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Update norm per site (``updates`` maps site name to the returned arrays)."""
    return {site: update_norm(sent, arrays) for site, arrays in updates.items()}


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


DP_METADATA_KEYS = ("dp-epsilon-spent", "dp-noise-multiplier", "dp-sample-rate")


def has_dp_metadata(metrics: Mapping) -> bool:
    """Whether a train reply says how it was privatised (needed when ``dp-required``)."""
    return all(key in metrics and metrics[key] is not None for key in DP_METADATA_KEYS)
