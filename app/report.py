"""``report.md`` + PNG plots of a run directory (end of every run, and ``fedimaging report RUN_DIR``).

Built only from what the run directory holds (DESIGN 3.5): ``run_config.json``, ``metrics.jsonl``,
``cross_site.json``, the saved server state and which model files exist. Fingerprints never reach
the server, so the per-site data summary shows what sites reported (case counts and numeric
metrics). Every input may be missing or damaged (a run that crashed in round 2 still gets a
report): a problem becomes a line under "Notes", never an exception. Files are written
atomically; plots are ``report-*.png`` next to ``report.md`` (stale ones from an earlier report
are removed).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app import report_plots as plots
from app.console import format_table
from fedimaging.io import atomic_write_text

REPORT_NAME = "report.md"
PLOT_PREFIX = "report-"
MAIN_METRICS = ("dice", "hd95", "auc", "accuracy", "balanced-accuracy")
NOT_PLOTTED = {"num-examples", "train-steps", "train-seconds", "dp-epsilon-spent", "dp-study-epsilon"}
MAX_PANELS = 6
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"`{path.name}` could not be read ({type(exc).__name__}); its section is left out.")
        return None


def load_run(root: Path) -> RunData:
    """Read the run directory tolerantly (torn/invalid lines skipped and counted)."""
    data = RunData(root)
    config = _read_json(root / "run_config.json", data.notes)
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
    cross = _read_json(root / "cross_site.json", data.notes)
    if isinstance(cross, dict):
        data.cross_site = cross
    latest = _read_json(root / "server_state" / "latest.json", data.notes)
    if isinstance(latest, dict) and isinstance(latest.get("folder"), str) and "/" not in latest["folder"]:
        state = _read_json(root / "server_state" / latest["folder"] / "state.json", data.notes)
        if isinstance(state, dict):
            data.server_state = state
    return data


# --------------------------------------------------------------------------------------------
# Data extraction (pure functions over records)
# --------------------------------------------------------------------------------------------
def _phase(records: list[dict], phase: str) -> list[dict]:
    return sorted((r for r in records if r.get("phase") == phase and r["round"] > 0), key=lambda r: r["round"])


def aggregate_series(records: list[dict], phase: str, key: str) -> dict[int, float]:
    out = {}
    for r in _phase(records, phase):
        v = _number((r.get("aggregate") or {}).get(key))
        if v is not None:
            out[r["round"]] = v
    return out


def site_series(records: list[dict], phase: str, key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in _phase(records, phase):
        for site, metrics in (r.get("sites") or {}).items():
            if isinstance(metrics, Mapping):
                v = _number(metrics.get(key))
                if v is not None:
                    out.setdefault(str(site), {})[r["round"]] = v
    return out


def metric_keys(records: list[dict], phase: str, where: str = "aggregate") -> list[str]:
    """Numeric metric names seen, main metrics first."""
    keys: set[str] = set()
    for r in _phase(records, phase):
        blocks = [r.get("aggregate") or {}] if where == "aggregate" else list((r.get("sites") or {}).values())
        for block in blocks:
            if isinstance(block, Mapping):
                keys.update(k for k, v in block.items() if _number(v) is not None and k not in NOT_PLOTTED)
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
    for r in _phase(records, "evaluate"):
        for k, v in (r.get("server") or {}).items():
            if _number(v) is not None and k in panels:
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
            n = _number(metrics.get("num-examples"))
            if r["phase"] == "train":
                entry["rounds trained"] += 1
                entry["train cases"] = int(n) if n is not None else entry["train cases"]
                eps = _number(metrics.get("dp-epsilon-spent"))
                entry["epsilon"] = eps if eps is not None else entry["epsilon"]
            else:
                entry["rounds evaluated"] += 1
                entry["test cases"] = int(n) if n is not None else entry["test cases"]
                v = _number(metrics.get(metric))
                entry[metric] = v if v is not None else entry[metric]
            for k, v in metrics.items():
                if _number(v) is not None and k not in ("num-examples", metric, "dp-epsilon-spent", "loss"):
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
def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        if abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        value = json.dumps(value, sort_keys=True)
    text = _CONTROL.sub(" ", _ANSI.sub("", str(value)))  # reasons may carry terminal colour codes
    return text.replace("<", "&lt;").replace("|", "\\|")  # no HTML tags, no broken tables


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _status(data: RunData) -> list[str]:
    planned = data.config.get("num-server-rounds")
    rounds = sorted({r["round"] for r in data.records if r["round"] > 0})
    done = rounds[-1] if rounds else 0
    final = (data.root / "final_model.pt").exists()
    if final and (not isinstance(planned, int) or done >= planned):
        state = "complete"
    elif final:
        state = f"stopped early after round {done}"
    else:
        state = f"incomplete (last round recorded: {done}; no final model)"
    metric = data.metric
    lines = ["## Summary", ""]
    rows = [["task", data.config.get("task", "?")], ["strategy", data.config.get("strategy", "?")],
            ["rounds", f"{done} of {planned if planned is not None else '?'}"], ["status", state]]
    evaluations = [(r["round"], _number((r.get("aggregate") or {}).get(metric))) for r in _phase(data.records, "evaluate")]
    evaluations = [(rnd, v) for rnd, v in evaluations if v is not None]
    if evaluations:
        lower = metric in ("hd95", "loss")
        best = (min if lower else max)(evaluations, key=lambda p: p[1])
        rows.append([f"final global {metric}", f"{evaluations[-1][1]:.4f} (round {evaluations[-1][0]})"])
        rows.append([f"best global {metric}", f"{best[1]:.4f} (round {best[0]})"])
    sites = sorted({s for r in data.records for s in (r.get("sites") or {})})
    if sites:
        rows.append(["sites", ", ".join(sites)])
    seconds = sum(_number(r.get("seconds")) or 0.0 for r in data.records)
    if seconds:
        rows.append(["time in rounds", f"{seconds:.1f} s"])
    return lines + _table(["item", "value"], rows)


def _evaluation_schedule(config: Mapping[str, Any]) -> list[str]:
    """What the per-round evaluation numbers mean when evaluate-every / evaluate-received are set."""
    lines = []
    every = config.get("evaluate-every", 1)
    if isinstance(every, int) and every != 1:
        lines.append(f"The global model was evaluated every {every} rounds and after the last one "
                     f"(`evaluate-every={every}`); other rounds have no evaluate values." if every else
                     "The global model was evaluated only after the last round (`evaluate-every=0`).")
    if config.get("evaluate-received"):
        lines.append("Train records also hold `received-*`: each site's test metrics of the model it received in "
                     "that round, i.e. the global model after the previous round (round 1: the initial model), "
                     "measured before local training (`evaluate-received`); their aggregate is weighted by test cases.")
    return [" ".join(lines), ""] if lines else []


def build_markdown(data: RunData, figures: dict[str, str]) -> str:
    metric = data.metric
    name = data.root.name
    out = [f"# Run report: {name}", "",
           f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from `{data.root}`.", ""]
    out += _status(data)
    if data.records:
        out += ["## Rounds", "", "```", format_table(data.records, metric), "```", "",
                "`sites`: sites sampled for training; `excl`: sites excluded that round (any phase); "
                "`epsilon`: the largest cumulative DP epsilon any site reported.", ""]

    out += ["## Global model per round", ""]
    out += [f"![global metrics]({figures['global']})", ""] if "global" in figures else ["No aggregate metrics recorded.", ""]
    out += ["Train loss is the sites' case-weighted mean training loss; evaluate values are the case-weighted "
            "means of the sites' test metrics for the global model.", ""]
    out += _evaluation_schedule(data.config)

    out += ["## Per-site metrics per round", ""]
    out += [f"![per-site metrics]({figures['sites']})", ""] if "sites" in figures else ["No per-site metrics recorded.", ""]

    out += ["## Privacy", ""]
    if "epsilon" in figures:
        out += [f"![epsilon spent per site]({figures['epsilon']})", ""]
    else:
        out += ["No site reported `dp-epsilon-spent` (no differential privacy in this run).", ""]

    out += ["## Cross-site evaluation", ""]
    cross = data.cross_site
    if cross:
        out += [f"Metric: `{cross.get('metric', metric)}`, after round {cross.get('round', '?')}. Rows: models "
                "(`global`, and `local:<site>` = trained on that site alone); columns: the site whose test cases "
                "were used (`unseen`: a site that never trained).", ""]
        if "cross_site" in figures:
            out += [f"![cross-site matrix]({figures['cross_site']})", ""]
        summary = cross.get("summary") or {}
        if isinstance(summary, Mapping) and summary:
            out += _table(["summary", "value"], [[k, _number(v)] for k, v in summary.items()])
    else:
        out += ["No `cross_site.json` (cross-site evaluation was off or the run did not finish).", ""]

    out += ["## Sites: data and participation", "",
            "Site fingerprints stay at the sites; these are the numbers the sites reported.", ""]
    rows = site_summary(data.records, metric)
    if rows:
        header = ["site", "train cases", "test cases", "rounds trained", "rounds evaluated", "times excluded",
                  f"last {metric}", "epsilon", "other numeric metrics (latest)"]
        out += _table(header, [[r["site"], r["train cases"], r["test cases"], r["rounds trained"], r["rounds evaluated"],
                                r["times excluded"], r[metric], r["epsilon"],
                                ", ".join(f"{k}={_cell(v)}" for k, v in sorted(r["other"].items()))] for r in rows])
    else:
        out += ["No site reported yet.", ""]

    out += ["## Excluded updates", ""]
    excl = exclusions(data)
    out += _table(["round", "phase", "site", "reason"], [list(e) for e in excl]) if excl else ["None: every reply was accepted.", ""]
    sampling = (data.server_state or {}).get("excluded_from_sampling") or {}
    if isinstance(sampling, Mapping) and sampling:
        out += ["Sites no longer sampled (refused to take part):", ""]
        out += _table(["site", "reason"], [[k, v] for k, v in sorted(sampling.items())])

    if "seconds" in figures:
        out += ["## Time", "", f"![seconds per round]({figures['seconds']})", ""]

    out += ["## Run configuration", ""]
    config = {k: v for k, v in data.config.items() if not k.startswith("_")}
    out += _table(["key", "value"], [[k, v] for k, v in config.items()]) if config else ["Unknown (no run_config.json).", ""]
    env = data.config.get("_environment")
    if isinstance(env, Mapping):
        out += ["Environment:", ""] + _table(["package", "version"], [[k, v] for k, v in env.items()])

    out += ["## Files", ""]
    files = ["run_config.json", "metrics.jsonl", "final_model.pt", "checkpoints/best.pt", "checkpoints/last.pt",
             "cross_site.json", "server_state/latest.json"]
    out += [f"- `{f}`: {'present' if (data.root / f).exists() else 'missing'}" for f in files] + [""]
    if data.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _epsilon_budget(config: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    budget = _number(config.get("dp-epsilon"))
    return {"dp-epsilon-spent": (budget, f"run budget {budget:g}")} if budget else {}


def _draw(data: RunData) -> dict[str, str]:
    """Draw every figure the data allows; a failing plot becomes a note, not an exception."""
    root, figures = data.root, {}
    eps = site_series(data.records, "train", "dp-epsilon-spent")
    cross = data.cross_site or {}
    train_s = {r["round"]: _number(r.get("seconds")) or 0.0 for r in _phase(data.records, "train")}
    eval_s = {r["round"]: _number(r.get("seconds")) or 0.0 for r in _phase(data.records, "evaluate")}
    jobs = {
        "global": lambda p: plots.plot_panels(global_panels(data.records), p, "Global (aggregated) model",
                                              styles={"server-side": "--"}),
        "sites": lambda p: plots.plot_panels(site_panels(data.records), p, "Per-site metrics"),
        "epsilon": lambda p: plots.plot_panels({"dp-epsilon-spent": eps}, p, "Differential privacy budget spent",
                                               hlines=_epsilon_budget(data.config)),
        "cross_site": lambda p: plots.plot_heatmap(
            [str(m) for m in cross.get("models") or []], [str(s) for s in cross.get("sites") or []],
            cross.get("matrix") or [], str(cross.get("metric", data.metric)), p),
        "seconds": lambda p: plots.plot_seconds(train_s, eval_s, p),
    }
    for key, draw in jobs.items():
        name = f"{PLOT_PREFIX}{key.replace('_', '-')}.png"
        try:
            if draw(root / name):
                figures[key] = name
        except Exception as exc:  # noqa: BLE001 - a plot must never cost the run its report
            data.notes.append(f"plot `{name}` failed: {type(exc).__name__}: {exc}")
    for stale in root.glob(f"{PLOT_PREFIX}*.png"):
        if stale.name not in figures.values():
            stale.unlink(missing_ok=True)
    return figures


def write_report(run_dir: Path) -> Path:
    """(Re)build ``<run_dir>/report.md`` and its plots; returns the report path."""
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist")
    data = load_run(root)
    figures = _draw(data)
    target = root / REPORT_NAME
    atomic_write_text(target, build_markdown(data, figures))
    return target


def report_main(argv: list[str] | None = None) -> int:
    """``fedimaging report RUN_DIR``: 0 written, 2 not a run directory."""
    p = argparse.ArgumentParser(prog="fedimaging report", description="(Re)build a run's report.md and plots.")
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    root = args.run_dir.expanduser()
    if not root.is_dir() or not any((root / f).exists() for f in ("run_config.json", "metrics.jsonl")):
        print(f"error: {root} is not a run directory (no run_config.json or metrics.jsonl)", file=sys.stderr)
        return 2
    print(write_report(root))
    return 0


if __name__ == "__main__":
    sys.exit(report_main())
