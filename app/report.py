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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app import report_plots as plots
from app.console import format_table
from app.report_data import (  # noqa: F401 - load_run, site_summary, exclusions: the report's API
    RunData,
    exclusions,
    finite_number,
    global_panels,
    load_run,
    phase_records,
    read_json_noted,
    site_panels,
    site_series,
    site_summary,
)
from fedimaging.io import atomic_write_text

REPORT_NAME = "report.md"
PLOT_PREFIX = "report-"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    failure = read_json_noted(data.root / "failed.json", data.notes)
    if isinstance(failure, dict):
        state = f"failed: {failure.get('reason', 'unknown')}"
    elif final and (not isinstance(planned, int) or done >= planned):
        state = "complete"
    elif final:
        state = f"stopped early after round {done}"
    else:
        state = f"incomplete (last round recorded: {done}; no final model)"
    metric = data.metric
    lines = ["## Summary", ""]
    rows = [["task", data.config.get("task", "?")], ["strategy", data.config.get("strategy", "?")],
            ["rounds", f"{done} of {planned if planned is not None else '?'}"], ["status", state]]
    evaluations = [(r["round"], finite_number((r.get("aggregate") or {}).get(metric))) for r in phase_records(data.records, "evaluate")]
    evaluations = [(rnd, v) for rnd, v in evaluations if v is not None]
    if evaluations:
        lower = metric in ("hd95", "loss")
        best = (min if lower else max)(evaluations, key=lambda p: p[1])
        rows.append([f"final global {metric}", f"{evaluations[-1][1]:.4f} (round {evaluations[-1][0]})"])
        rows.append([f"best global {metric}", f"{best[1]:.4f} (round {best[0]})"])
    sites = sorted({s for r in data.records for s in (r.get("sites") or {})})
    if sites:
        rows.append(["sites", ", ".join(sites)])
    seconds = sum(finite_number(r.get("seconds")) or 0.0 for r in data.records)
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
        personal = any(f"personal-{metric}" in (r.get("aggregate") or {}) for r in data.records if isinstance(r, dict))
        out += ["## Rounds", "", "```", format_table(data.records, metric, personal), "```", "",
                "`sites`: sites sampled for training; `excl`: sites excluded that round (any phase); "
                "`epsilon`: the largest cumulative DP epsilon any site reported"
                + ("; `personal`: the sites' personal models (each at its own site)." if personal else "."), ""]

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
            out += _table(["summary", "value"], [[k, finite_number(v)] for k, v in summary.items()])
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
    budget = finite_number(config.get("dp-epsilon"))
    return {"dp-epsilon-spent": (budget, f"run budget {budget:g}")} if budget else {}


def _draw(data: RunData) -> dict[str, str]:
    """Draw every figure the data allows; a failing plot becomes a note, not an exception."""
    root, figures = data.root, {}
    eps = site_series(data.records, "train", "dp-epsilon-spent")
    cross = data.cross_site or {}
    train_s = {r["round"]: finite_number(r.get("seconds")) or 0.0 for r in phase_records(data.records, "train")}
    eval_s = {r["round"]: finite_number(r.get("seconds")) or 0.0 for r in phase_records(data.records, "evaluate")}
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
