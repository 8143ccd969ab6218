"""Aggregation maths as pure functions on ``dict[str, np.ndarray]`` (tests call them directly).

Every function is deterministic for a given input order (callers sort replies by site name) and
returns arrays of the dtype that was sent: floating results are cast back to the parameter's
dtype, integer buffers (e.g. BatchNorm ``num_batches_tracked``) are rounded back to integers.
Sums are taken in float64 so the order of summation barely matters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

Arrays = dict[str, np.ndarray]


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Return ``value`` with the dtype (and shape) of ``like``; integers are rounded, bools thresholded."""
    value = np.asarray(value)
    if like.dtype == np.bool_:
        return np.asarray(value >= 0.5).reshape(like.shape)
    if np.issubdtype(like.dtype, np.integer):
        info = np.iinfo(like.dtype)
        return np.clip(np.rint(value), info.min, info.max).astype(like.dtype).reshape(like.shape)
    return np.asarray(value, dtype=like.dtype).reshape(like.shape)


def is_float(array: np.ndarray) -> bool:
    """True for floating-point arrays (the ones optimizers and norms act on)."""
    return bool(np.issubdtype(np.asarray(array).dtype, np.floating))


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need at least one weight")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {list(weights)}")
    return w / w.sum()


def weighted_mean(arrays_list: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
    """Weighted mean of several array dicts with the same keys (FedAvg), keys in the first dict's order."""
    if len(arrays_list) != len(weights):
        raise ValueError(f"{len(arrays_list)} array sets but {len(weights)} weights")
    w = _normalised(weights)
    first = arrays_list[0]
    out: Arrays = {}
    for key, ref in first.items():
        acc = np.zeros(np.shape(ref), dtype=np.float64)
        for arrays, wi in zip(arrays_list, w):
            acc += wi * np.asarray(arrays[key], dtype=np.float64)
        out[key] = cast_like(acc, np.asarray(ref))
    return out


def fixed_denominator_mean(current: Mapping[str, np.ndarray], arrays_list: Sequence[Mapping[str, np.ndarray]],
                           denominator: int) -> Arrays:
    """``current + sum(arrays_i - current) / denominator`` (DP-FedAvg's uniform, fixed-n estimator).

    One site changes the result by at most its update / ``denominator``, however many sites
    answered: the sensitivity central DP's noise is calibrated for.
    """
    if denominator < len(arrays_list) or denominator < 1:
        raise ValueError(f"denominator {denominator} is smaller than the {len(arrays_list)} updates")
    out: Arrays = {}
    for key, ref in current.items():
        base = np.asarray(ref, dtype=np.float64)
        acc = np.zeros_like(base)
        for arrays in arrays_list:
            acc += np.asarray(arrays[key], dtype=np.float64) - base
        out[key] = cast_like(base + acc / denominator, np.asarray(ref))
    return out


def coordinate_median(arrays_list: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
    """Element-wise median across sites (FedMedian, Yin et al. 2018)."""
    first = arrays_list[0]
    return {
        key: cast_like(
            np.median(np.stack([np.asarray(a[key], dtype=np.float64) for a in arrays_list]), axis=0),
            np.asarray(ref),
        )
        for key, ref in first.items()
    }


def trimmed_mean(arrays_list: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Arrays:
    """Element-wise mean after cutting ``trim_fraction`` of the sites from each tail (Flower's trim_mean)."""
    first = arrays_list[0]
    return {
        key: cast_like(
            trim_mean(np.stack([np.asarray(a[key], dtype=np.float64) for a in arrays_list]), trim_fraction),
            np.asarray(ref),
        )
        for key, ref in first.items()
    }


def server_step(current: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray], server_lr: float) -> Arrays:
    """``x + lr * (aggregated - x)`` for float arrays; lr == 1 returns ``aggregated`` exactly.

    Integer buffers always take the aggregated value.
    """
    if server_lr == 1.0:
        return {k: np.asarray(v) for k, v in aggregated.items()}
    out: Arrays = {}
    for key, agg in aggregated.items():
        x = np.asarray(current[key])
        if not is_float(x):
            out[key] = np.asarray(agg)
            continue
        step = np.asarray(agg, dtype=np.float64) - x.astype(np.float64)
        out[key] = cast_like(x.astype(np.float64) + server_lr * step, x)
    return out


def adam_step(
    current: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None,
    *,
    server_round: int,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    yogi: bool = False,
) -> tuple[Arrays, Arrays, Arrays]:
    """One FedAdam / FedYogi server step (Reddi et al. 2021), the same maths as Flower's built-ins.

    ``delta = aggregated - current``; ``m = b1 m + (1-b1) delta``; Adam: ``v = b2 v + (1-b2) delta^2``,
    step size bias-corrected with ``server_round`` like Flower; Yogi:
    ``v = v - (1-b2) delta^2 sign(v - delta^2)``, plain step size.
    Only float arrays are optimized; integer buffers take the aggregated value.
    Returns ``(new_arrays, m, v)``; the moments are kept in the parameters' dtype.
    """
    new: Arrays = {}
    m_out: Arrays = {}
    v_out: Arrays = {}
    if yogi:
        step_size = eta
    else:
        step_size = eta * np.sqrt(1 - np.power(beta_2, server_round + 1.0)) / (
            1 - np.power(beta_1, server_round + 1.0)
        )
    for key, agg in aggregated.items():
        x = np.asarray(current[key])
        if not is_float(x):
            new[key] = np.asarray(agg)
            continue
        delta = np.asarray(agg, dtype=x.dtype) - x
        m_prev = np.zeros_like(x) if m is None or key not in m else np.asarray(m[key])
        v_prev = np.zeros_like(x) if v is None or key not in v else np.asarray(v[key])
        m_new = beta_1 * m_prev + (1 - beta_1) * delta
        if yogi:
            v_new = v_prev - (1.0 - beta_2) * (delta**2) * np.sign(v_prev - delta**2)
        else:
            v_new = beta_2 * v_prev + (1 - beta_2) * (delta**2)
        m_out[key] = m_new.astype(x.dtype)
        v_out[key] = v_new.astype(x.dtype)
        new[key] = cast_like(x + step_size * m_new / (np.sqrt(v_new) + tau), x)
    return new, m_out, v_out


def scaffold_step(
    current: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    control: Mapping[str, np.ndarray],
    mean_delta_c: Mapping[str, np.ndarray],
    *,
    server_lr: float,
    num_sampled: int,
    num_total: int,
) -> tuple[Arrays, Arrays]:
    """SCAFFOLD server update (Karimireddy et al. 2020, Alg. 1 lines 16-17).

    ``x += server_lr * (aggregated - x)`` (aggregated = case-weighted mean of the site models, i.e.
    mean of ``y_i - x``) and ``c += (|S| / N) * mean(delta_c_i)``. Integer buffers are averaged.
    Returns ``(new_arrays, new_control)``.
    """
    if num_total <= 0 or not 0 < num_sampled <= num_total:
        raise ValueError(f"need 0 < |S|={num_sampled} <= N={num_total}")
    new = server_step(current, aggregated, server_lr)
    frac = num_sampled / num_total
    new_c: Arrays = {}
    for key, c in control.items():
        c = np.asarray(c)
        if not is_float(c) or key not in mean_delta_c:
            new_c[key] = c
            continue
        new_c[key] = cast_like(c.astype(np.float64) + frac * np.asarray(mean_delta_c[key], np.float64), c)
    return new, new_c


def update_norm(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``received - sent`` over the float arrays (the model update a site proposes)."""
    total = 0.0
    for key, x in sent.items():
        x = np.asarray(x)
        if not is_float(x):
            continue
        d = (np.asarray(received[key], dtype=np.float64) - x).ravel()
        total += float(np.einsum("i,i->", d, d))  # not np.dot: BLAS threads are slow on busy hosts
    return float(np.sqrt(total))


def clip_update(
    sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], max_norm: float
) -> Arrays:
    """Scale the float part of ``received - sent`` so its L2 norm is at most ``max_norm``."""
    norm = update_norm(sent, received)
    if norm <= max_norm or norm == 0.0:
        return {k: np.asarray(v) for k, v in received.items()}
    return server_step(sent, received, max_norm / norm)  # sent + factor * (received - sent)
