"""PNG figures of a run report, drawn with matplotlib's object API (Agg canvas, no pyplot).

No pyplot means no global backend or figure state: safe inside the ServerApp process and in
threads. Each function takes plain data pulled from metrics.jsonl / cross_site.json, writes one
PNG atomically and returns whether it drew anything (no data, no file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedimaging.io import atomic_path

Series = dict[str, dict[int, float]]  # line label -> {round: value}

DPI = 110
TITLES = {
    "loss": "loss", "dice": "Dice (higher is better)", "hd95": "HD95 (mm, lower is better)",
    "accuracy": "accuracy", "balanced-accuracy": "balanced accuracy", "auc": "AUC",
    "dp-epsilon-spent": "epsilon spent (cumulative)",
}


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _grid(n: int) -> tuple[int, int]:
    cols = 1 if n == 1 else 2 if n <= 4 else 3
    return math.ceil(n / cols), cols


def _style(ax, title: str, ylabel: str | None = None) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("round", fontsize=10)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=9)


def _lines(ax, series: Series, colors: Mapping[str, str], styles: Mapping[str, str] | None = None) -> None:
    """One line per series; a round missing inside a series' range shows as a gap, not a bridge."""
    for label, points in series.items():
        if not points:
            continue
        rounds = list(range(min(points), max(points) + 1))
        values = [points.get(r, math.nan) for r in rounds]
        ax.plot(rounds, values, marker="o", markersize=4, linewidth=1.6, color=colors.get(label),
                linestyle=(styles or {}).get(label, "-"), label=label)


def plot_panels(panels: Mapping[str, Series], path: Path, suptitle: str,
                styles: Mapping[str, str] | None = None, hlines: Mapping[str, tuple[float, str]] | None = None) -> bool:
    """One subplot per metric (panel), one line per series (same colour for a label in every panel).

    When every panel shows the same many series (sites), one legend goes below the figure;
    otherwise each panel with more than one line gets its own. ``hlines`` adds a labelled
    horizontal reference line to a panel (e.g. the epsilon budget).
    """
    panels = {k: {n: p for n, p in v.items() if p} for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return False
    rows, cols = _grid(len(panels))
    order: list[str] = []
    for series in panels.values():
        order += [label for label in series if label not in order]
    colors = {label: f"C{i % 10}" for i, label in enumerate(order)}
    rounds = [r for series in panels.values() for pts in series.values() for r in pts]
    xlim = (min(rounds) - 0.5, max(rounds) + 0.5)  # same rounds on every panel, integer ticks even for one round
    shared = len({tuple(sorted(v)) for v in panels.values()}) == 1
    legend_below = shared and len(order) > 4 and len(panels) > 1
    legend_right = len(panels) == 1 and len(order) > 4
    width = 5.2 * cols + (2.0 if legend_right else 0)
    fig = Figure(figsize=(width, 3.6 * rows + (0.5 if legend_below else 0)), layout="constrained")
    fig.suptitle(suptitle, fontsize=13)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (metric, series) in zip(axes, panels.items()):
        _lines(ax, series, colors, styles)
        if hlines and metric in hlines:
            value, label = hlines[metric]
            ax.axhline(value, color="black", linestyle=":", linewidth=1.2, label=label)
        _style(ax, TITLES.get(metric, metric))
        ax.set_xlim(*xlim)
        if legend_right:
            handles, names = ax.get_legend_handles_labels()
            fig.legend(handles, names, loc="outside right upper", fontsize=9)
        elif not legend_below and (len(series) > 1 or (hlines and metric in hlines) or len(panels) == 1):
            ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if legend_below:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6), fontsize=9)
    _save(fig, path)
    return True


def plot_heatmap(models: Sequence[str], sites: Sequence[str], matrix: Sequence[Sequence[Any]], metric: str,
                 path: Path) -> bool:
    """Cross-site matrix: rows = models, columns = evaluation sites, each cell annotated."""
    if not models or not sites:
        return False
    import numpy as np

    values = np.full((len(models), len(sites)), np.nan)
    for i, row in enumerate(matrix[: len(models)]):
        for j, v in enumerate(list(row)[: len(sites)]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values[i, j] = float(v)
    if np.isnan(values).all():
        return False
    lower_better = metric in ("hd95", "loss")
    cmap = "viridis_r" if lower_better else "viridis"
    fig = Figure(figsize=(max(5.0, 1.25 * len(sites) + 3.0), max(3.0, 0.6 * len(models) + 1.8)), layout="constrained")
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    vmin, vmax = (0.0, 1.0) if metric in ("dice", "auc", "accuracy", "balanced-accuracy") else (finite.min(), finite.max())
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(sites)), labels=list(sites), rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(models)), labels=list(models), fontsize=9)
    ax.set_xlabel("evaluated on site", fontsize=10)
    ax.set_ylabel("model", fontsize=10)
    ax.set_title(f"Cross-site {TITLES.get(metric, metric)}", fontsize=12)
    span = (vmax - vmin) or 1.0
    for i in range(len(models)):
        for j in range(len(sites)):
            v = values[i, j]
            if np.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=9, color="black")
                continue
            frac = (v - vmin) / span
            dark = frac > 0.6 if lower_better else frac < 0.6
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, shrink=0.9).ax.tick_params(labelsize=8)
    _save(fig, path)
    return True


def plot_seconds(train: Mapping[int, float], evaluate: Mapping[int, float], path: Path) -> bool:
    """Wall-clock seconds per round, stacked train + evaluate."""
    rounds = sorted(set(train) | set(evaluate))
    if not rounds:
        return False
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    t = [train.get(r, 0.0) for r in rounds]
    e = [evaluate.get(r, 0.0) for r in rounds]
    ax.bar(rounds, t, label="train", color="#4c72b0")
    ax.bar(rounds, e, bottom=t, label="evaluate", color="#dd8452")
    _style(ax, "Seconds per round", "seconds")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True
