"""Per-case statistics and the site fingerprint (aggregates only, never per-case values).

Histograms use fixed bin edges per modality so fingerprints of different sites can be added
and compared: CT in HU from -1024 to 3072 by 32, MR raw intensity from 0 to 4096 by 32, each
with an underflow and overflow count. With fewer than ``MIN_CASES`` cases the statistics are
omitted, because an aggregate of one or two cases describes those patients.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

MIN_CASES = 5
BIN_EDGES = {
    "CT": np.arange(-1024, 3072 + 32, 32, dtype=float),
    "MR": np.arange(0, 4096 + 32, 32, dtype=float),
}


def _histogram(data: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Counts in fixed bins (uniform width), plus underflow and overflow, slice by slice."""
    width = edges[1] - edges[0]
    nbins = len(edges) - 1
    counts = np.zeros(nbins + 2, dtype=np.int64)  # [under, bins..., over]
    for chunk in _chunks(data):
        idx = np.floor((chunk.astype(np.float32) - edges[0]) / width).astype(np.int64)
        idx[chunk == edges[-1]] = nbins - 1  # the last bin is closed, like numpy's
        np.clip(idx + 1, 0, nbins + 1, out=idx)
        counts += np.bincount(idx.ravel(), minlength=nbins + 2)
    return counts[1:-1], int(counts[0]), int(counts[-1])


def _chunks(data: np.ndarray, voxels: int = 1 << 22):
    """Views of about ``voxels`` voxels along the array's slowest axis in memory (no copies)."""
    arr = data if data.flags.c_contiguous else data.T  # prep's arrays are F-ordered views
    step = max(1, voxels // max(1, int(np.prod(arr.shape[1:]))))
    for start in range(0, arr.shape[0], step):
        yield arr[start:start + step]


def _int16_value_counts(data: np.ndarray) -> np.ndarray:
    """Count of every int16 value (index = value + 32768); one fast pass."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for chunk in _chunks(data):
        counts += np.bincount((chunk.astype(np.int32) + 32768).ravel(), minlength=1 << 16)
    return counts


def case_stats(data: np.ndarray, modality: str, label: np.ndarray | None = None) -> dict:
    """Sufficient statistics of one case (kept in the private state, aggregated later)."""
    edges = BIN_EDGES.get(modality, BIN_EDGES["MR"])
    if data.dtype in (np.int16, np.uint8, np.int8):
        per_value = _int16_value_counts(data)
        values = np.arange(-32768, 32768, dtype=np.float64)
        total = float(per_value @ values)
        totalsq = float(per_value @ (values * values))
        idx = np.clip(np.searchsorted(edges, values, side="right") - 1, -1, len(edges) - 1)
        idx[values == edges[-1]] = len(edges) - 2  # the last bin is closed, like numpy's
        binned = np.bincount(idx + 1, weights=per_value, minlength=len(edges) + 1).astype(np.int64)
        counts, under, over = binned[1:-1], int(binned[0]), int(binned[-1])
    else:
        total = totalsq = 0.0
        for chunk in _chunks(data):
            c = chunk.astype(np.float64).ravel()
            total += float(c.sum())
            totalsq += float(np.dot(c, c))
        counts, under, over = _histogram(data, edges)
    stats = {
        "voxels": int(data.size),
        "sum": total,
        "sumsq": totalsq,
        "histogram": counts.astype(int).tolist(),
        "under": under,
        "over": over,
    }
    if label is not None:
        n = np.bincount(np.asarray(label).ravel(order="K").astype(np.int64))
        stats["label_voxels"] = {str(v): int(c) for v, c in enumerate(n) if c}
    return stats


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def _hist_percentile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    cum = np.cumsum(counts)
    if cum[-1] == 0:
        return float("nan")
    idx = int(np.searchsorted(cum, q / 100.0 * cum[-1]))
    return float(edges[min(idx + 1, len(edges) - 1)])


def build_fingerprint(cases: list[dict], modality: str, counts: dict) -> dict:
    """Aggregate fingerprint from per-case records (``shape``, ``spacing``, ``stats``, ``manufacturer``)."""
    out = {"modality": modality, "counts": counts, "min_cases_for_statistics": MIN_CASES}
    if len(cases) < MIN_CASES:
        out["statistics"] = None
        return out
    edges = BIN_EDGES.get(modality, BIN_EDGES["MR"])
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    under = over = voxels = 0
    total = totalsq = 0.0
    label_voxels: Counter = Counter()
    for c in cases:
        s = c["stats"]
        hist += np.asarray(s["histogram"], dtype=np.int64)
        under += s["under"]
        over += s["over"]
        voxels += s["voxels"]
        total += s["sum"]
        totalsq += s["sumsq"]
        label_voxels.update(s.get("label_voxels", {}))
    mean = total / voxels
    std = float(np.sqrt(max(totalsq / voxels - mean * mean, 0.0)))
    manufacturers = Counter(c.get("manufacturer") or "unknown" for c in cases)
    out["statistics"] = {
        "spacing_mm": {axis: _summary([c["spacing"][i] for c in cases]) for i, axis in enumerate("xyz")},
        "shape": {axis: _summary([c["shape"][i] for c in cases]) for i, axis in enumerate("xyz")},
        "manufacturers": dict(sorted(manufacturers.items())),
        "intensity": {
            "mean": mean,
            "std": std,
            "percentile_0_5": _hist_percentile(edges, hist, 0.5),
            "percentile_50": _hist_percentile(edges, hist, 50),
            "percentile_99_5": _hist_percentile(edges, hist, 99.5),
            "histogram": {"bin_edges": edges.tolist(), "counts": hist.tolist(),
                          "underflow": under, "overflow": over},
        },
        "label_voxels": dict(sorted(label_voxels.items(), key=lambda kv: int(kv[0]))),
    }
    return out
