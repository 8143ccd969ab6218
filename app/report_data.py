"""A run directory read for the report: tolerant of missing or damaged files, pure functions over it.

``load_run`` reads ``run_config.json``, ``metrics.jsonl``, ``cross_site.json`` and the server
state; a problem becomes a note, never an exception. The other functions turn the records into
the series, panels, per-site rows and exclusions the report shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimaging.io import read_json_object

MAIN_METRICS = ("dice", "hd95", "auc", "accuracy", "balanced-accuracy")
NOT_PLOTTED = {"num-examples", "train-steps", "train-seconds", "dp-epsilon-spent", "dp-study-epsilon"}
MAX_PANELS = 6


@dataclass
class RunData:
    """Everything readable from a run directory, plus notes on what was not."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    cross_site: dict[str, Any] | None = None
    server_state: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        task = self.config.get("task")
        best = self.config.get("best-metric")
        if isinstance(best, str) and best:
            return best
        if task == "classification":
            return "auc"
        return "dice"


def finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_json_noted(path: Path, notes: list[str]) -> Any:
    """The JSON object in ``path``; None (and a note) when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        return read_json_object(path)
    except ValueError:
        notes.append(f"`{path.name}` could not be read (not a readable JSON object); its section is left out.")
        return None


def load_run(root: Path) -> RunData:
    """Read the run directory tolerantly (torn/invalid lines skipped and counted)."""
    data = RunData(root)
    config = read_json_noted(root / "run_config.json", data.notes)
    if isinstance(config, dict):
        data.config = config
    elif not (root / "run_config.json").exists():
        data.notes.append("`run_config.json` is missing: the run configuration is unknown.")
    metrics = root / "metrics.jsonl"
    if metrics.exists():
        bad = 0
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record.get("phase") in ("train", "evaluate"):
                data.records.append(record)
            else:
                bad += 1
        if bad:
            data.notes.append(f"`metrics.jsonl`: {bad} incomplete or invalid line(s) skipped (e.g. a crash while writing).")
    else:
        data.notes.append("`metrics.jsonl` is missing: no round finished.")
    cross = read_json_noted(root / "cross_site.json", data.notes)
    if isinstance(cross, dict):
        data.cross_site = cross
    latest = read_json_noted(root / "server_state" / "latest.json", data.notes)
    if isinstance(latest, dict) and isinstance(latest.get("folder"), str) and "/" not in latest["folder"]:
        state = read_json_noted(root / "server_state" / latest["folder"] / "state.json", data.notes)
        if isinstance(state, dict):
            data.server_state = state
    return data


# --------------------------------------------------------------------------------------------
# Data extraction (pure functions over records)
# --------------------------------------------------------------------------------------------
def phase_records(records: list[dict], phase: str) -> list[dict]:
    return sorted((r for r in records if r.get("phase") == phase and r["round"] > 0), key=lambda r: r["round"])


def aggregate_series(records: list[dict], phase: str, key: str) -> dict[int, float]:
    out = {}
    for r in phase_records(records, phase):
        v = finite_number((r.get("aggregate") or {}).get(key))
        if v is not None:
            out[r["round"]] = v
    return out


def site_series(records: list[dict], phase: str, key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in phase_records(records, phase):
        for site, metrics in (r.get("sites") or {}).items():
            if isinstance(metrics, Mapping):
                v = finite_number(metrics.get(key))
                if v is not None:
                    out.setdefault(str(site), {})[r["round"]] = v
    return out


def metric_keys(records: list[dict], phase: str, where: str = "aggregate") -> list[str]:
    """Numeric metric names seen, main metrics first."""
    keys: set[str] = set()
    for r in phase_records(records, phase):
        blocks = [r.get("aggregate") or {}] if where == "aggregate" else list((r.get("sites") or {}).values())
        for block in blocks:
            if isinstance(block, Mapping):
                keys.update(k for k, v in block.items() if finite_number(v) is not None and k not in NOT_PLOTTED)
    main = [k for k in ("loss", *MAIN_METRICS) if k in keys]
    return main + sorted(keys - set(main))


def global_panels(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """Panels of the aggregate plot: loss (train and evaluate), then each evaluate metric."""
    panels: dict[str, dict[str, dict[int, float]]] = {
        "loss": {"train": aggregate_series(records, "train", "loss"),
                 "evaluate": aggregate_series(records, "evaluate", "loss")},
    }
    keys = [k for k in metric_keys(records, "evaluate") if k != "loss"]
    for key in keys:
        if key.startswith("dice-class") and "dice" in keys:
            panels.setdefault("dice", {})[key.replace("dice-", "")] = aggregate_series(records, "evaluate", key)
            continue
        panels.setdefault(key, {})["global" if key != "dice" else "mean"] = aggregate_series(records, "evaluate", key)
    server = {}
    for r in phase_records(records, "evaluate"):
        for k, v in (r.get("server") or {}).items():
            if finite_number(v) is not None and k in panels:
                server.setdefault(k, {})[r["round"]] = float(v)
    for k, pts in server.items():
        panels[k]["server-side"] = pts
    return dict(list(panels.items())[:MAX_PANELS])


def site_panels(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """Panels of the per-site plot: training loss, then each evaluate metric, then update norm."""
    panels = {"training loss": site_series(records, "train", "loss")}
    for key in metric_keys(records, "evaluate", where="sites"):
        if not key.startswith("dice-class"):
            panels[f"{key} (evaluate)" if key == "loss" else key] = site_series(records, "evaluate", key)
    norms = site_series(records, "train", "update-norm")
    if norms:
        panels["update norm (train)"] = norms
    return dict(list(panels.items())[:MAX_PANELS])


def site_summary(records: list[dict], metric: str) -> list[dict[str, Any]]:
    """Per site: cases reported, rounds trained/evaluated/excluded, latest metric and epsilon."""
    rows: dict[str, dict[str, Any]] = {}

    def row(site: str) -> dict[str, Any]:
        return rows.setdefault(site, {"site": site, "train cases": None, "test cases": None, "rounds trained": 0,
                                      "rounds evaluated": 0, "times excluded": 0, metric: None, "epsilon": None,
                                      "other": {}})

    for r in sorted(records, key=lambda r: (r["round"], r["phase"] != "train")):
        for site, metrics in (r.get("sites") or {}).items():
            if not isinstance(metrics, Mapping):
                continue
            entry = row(str(site))
            n = finite_number(metrics.get("num-examples"))
            if r["phase"] == "train":
                entry["rounds trained"] += 1
                entry["train cases"] = int(n) if n is not None else entry["train cases"]
                eps = finite_number(metrics.get("dp-epsilon-spent"))
                entry["epsilon"] = eps if eps is not None else entry["epsilon"]
            else:
                entry["rounds evaluated"] += 1
                entry["test cases"] = int(n) if n is not None else entry["test cases"]
                v = finite_number(metrics.get(metric))
                entry[metric] = v if v is not None else entry[metric]
            for k, v in metrics.items():
                if finite_number(v) is not None and k not in ("num-examples", metric, "dp-epsilon-spent", "loss"):
                    entry["other"][f"{k} ({r['phase']})" if k in ("update-norm",) else k] = float(v)
        for site in (r.get("excluded") or {}):
            row(str(site))["times excluded"] += 1
    return [rows[s] for s in sorted(rows)]


def exclusions(data: RunData) -> list[tuple[str, str, str, str]]:
    """(round, phase, site, reason) of every excluded or clipped reply, cross-site included."""
    out = []
    for r in sorted(data.records, key=lambda r: (r["round"], r["phase"])):
        for site, reason in (r.get("excluded") or {}).items():
            out.append((str(r["round"]), r["phase"], str(site), str(reason)))
        clipped = r.get("clipped") or {}
        if isinstance(clipped, Mapping):
            for site, note in clipped.items():
                out.append((str(r["round"]), r["phase"], str(site), f"kept, {note}"))
    if data.cross_site:
        for key, reason in (data.cross_site.get("excluded") or {}).items():
            out.append((str(data.cross_site.get("round", "final")), "cross-site", str(key), str(reason)))
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
