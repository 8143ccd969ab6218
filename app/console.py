"""Per-round summary table printed by the ServerApp (and embedded in ``report.md``).

Built only from ``metrics.jsonl`` records (DESIGN 3.5), so the console, the report and a
re-read of an old run show the same numbers. Plain text, fixed width, one line per round:

    round  sites  excl  train loss  eval loss    Dice  epsilon  seconds
        1      3     0      0.9123     0.8811  0.4210        -     12.4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

METRIC_TITLES = {"dice": "Dice", "auc": "AUC", "accuracy": "acc", "balanced-accuracy": "bal-acc", "hd95": "HD95"}
# (title, width) of each column; the metric column's title depends on the run
_COLUMNS = (("round", 5), ("sites", 5), ("excl", 4), ("train loss", 10), ("eval loss", 9), ("{metric}", 7),
            ("epsilon", 7), ("seconds", 7))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _fmt(value: Any, width: int, digits: int) -> str:
    number = _number(value)
    text = "-" if number is None else f"{number:.{digits}f}"
    return text.rjust(width)


def _widths(metric: str) -> list[int]:
    widths = [w for _, w in _COLUMNS]
    widths[5] = max(widths[5], len(METRIC_TITLES.get(metric, metric)))
    return widths


def format_header(metric: str = "dice", personal: bool = False) -> str:
    """Column titles (and a rule) for :func:`format_round_row`; ``personal``: one more column,
    the personal models' metric (``personalization``)."""
    title = METRIC_TITLES.get(metric, metric)
    cells = [name.format(metric=title).rjust(width) for (name, _), width in zip(_COLUMNS, _widths(metric))]
    if personal:
        cells.append(f"personal {title}")
    line = "  ".join(cells)
    return f"{line}\n{'-' * len(line)}"


def round_summary(records: Iterable[Mapping[str, Any]], metric: str = "dice") -> dict[str, Any]:
    """The numbers of one round from its metrics.jsonl records (train and/or evaluate phase)."""
    train = evaluate = None
    seconds = 0.0
    excluded: set[str] = set()
    for record in records:
        if not isinstance(record, Mapping):
            continue
        phase = record.get("phase")
        if phase == "train":
            train = record
        elif phase == "evaluate":
            evaluate = record
        seconds += _number(record.get("seconds")) or 0.0
        excluded.update(str(s) for s in (record.get("excluded") or {}))
    out: dict[str, Any] = {"sites": None, "excluded": len(excluded), "train_loss": None, "eval_loss": None,
                           "metric": None, "epsilon": None, "seconds": seconds}
    if train is not None:
        sites = train.get("sites") or {}
        out["sites"] = len(set(sites) | set(train.get("excluded") or {}))
        out["train_loss"] = (train.get("aggregate") or {}).get("loss")
        eps = [_number(m.get("dp-epsilon-spent")) for m in sites.values() if isinstance(m, Mapping)]
        eps = [e for e in eps if e is not None]
        out["epsilon"] = max(eps) if eps else None
    if evaluate is not None:
        agg = evaluate.get("aggregate") or {}
        out["eval_loss"] = agg.get("loss")
        out["metric"] = agg.get(metric)
        out["personal_metric"] = agg.get(f"personal-{metric}")
        if out["sites"] is None:
            out["sites"] = len(set(evaluate.get("sites") or {}) | set(evaluate.get("excluded") or {}))
    return out


def format_round_row(server_round: int, records: Iterable[Mapping[str, Any]], metric: str = "dice",
                     personal: bool = False) -> str:
    """One fixed-width line: round, sites sampled, sites excluded, losses, metric, max epsilon, seconds
    (and, with ``personal``, the personal models' metric)."""
    s = round_summary(records, metric)
    widths = _widths(metric)
    cells = [
        str(server_round).rjust(widths[0]),
        ("-" if s["sites"] is None else str(s["sites"])).rjust(widths[1]),
        str(s["excluded"]).rjust(widths[2]),
        _fmt(s["train_loss"], widths[3], 4),
        _fmt(s["eval_loss"], widths[4], 4),
        _fmt(s["metric"], widths[5], 4),
        _fmt(s["epsilon"], widths[6], 2),
        _fmt(s["seconds"], widths[7], 1),
    ]
    if personal:
        cells.append(_fmt(s.get("personal_metric"), len(f"personal {METRIC_TITLES.get(metric, metric)}"), 4))
    return "  ".join(cells)


def format_table(records: Iterable[Mapping[str, Any]], metric: str = "dice", personal: bool = False) -> str:
    """Header plus one row per round (rounds in order) for a whole metrics.jsonl."""
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for record in records:
        if isinstance(record, Mapping) and isinstance(record.get("round"), int):
            by_round.setdefault(int(record["round"]), []).append(record)
    rows = [format_round_row(r, by_round[r], metric, personal) for r in sorted(by_round) if r > 0]
    return "\n".join([format_header(metric, personal), *rows])
