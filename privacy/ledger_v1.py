"""Reading the version-1 ledgers (``ledger-<dataset id>.json``, one per training list), to migrate them.

Version 1 keyed the budget to a hash of the training list and the dataset name, so adding a case
or renaming the dataset started a fresh ledger at 0 (issue 18). Nothing writes this format any
more; :func:`read_v1` validates a file as strictly as before, so a damaged old ledger is an
error, never a budget quietly dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

V1_FORMAT = "fedimaging-privacy-ledger"
V1_NAME_RE = re.compile(r"^ledger-([A-Za-z0-9][A-Za-z0-9_.-]{0,127})\.json$")


class LedgerError(RuntimeError):
    """A privacy ledger cannot be trusted (missing, corrupt, edited, wrong site or format)."""


def checksum(body: dict) -> str:
    """SHA-256 of the canonical JSON of a ledger body (catches accidents, not deliberate edits)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dataset_id_from_training_list(training: Sequence[Any], name: str = "") -> str:
    """The version-1 dataset id: SHA-256 of the training list and the dataset name."""
    blob = json.dumps({"name": name, "training": list(training)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def dataset_id_for(data_path: str | os.PathLike) -> str:
    """Version-1 dataset id of ``<data_path>/dataset.json`` (to find the old ledger to migrate)."""
    manifest = Path(data_path) / "dataset.json"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        training = meta["training"]
        name = str(meta.get("name", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise LedgerError(f"cannot read the training list from {manifest}: {exc}") from exc
    if not isinstance(training, list):
        raise LedgerError(f"{manifest}: 'training' must be a list")
    return dataset_id_from_training_list(training, name)


def number(value: Any, what: str, where: Path, *, upper: float | None = None, integer: bool = False) -> float:
    """A positive finite number (int when ``integer``), else LedgerError naming the file."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise LedgerError(f"{where}: {what} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    if upper is not None and value > upper:
        raise LedgerError(f"{where}: {what} must be at most {upper}, got {value!r}")
    return value


@dataclass(frozen=True)
class V1Ledger:
    """What a version-1 file charged: its history (settled and pending) and run names."""

    path: Path
    dataset_id: str
    mechanism: str
    segments: list[tuple[str, float, float, int]]  # (run_id, sigma, q, steps)


def read_v1(path: str | os.PathLike) -> V1Ledger:
    """Validate and read a version-1 ledger file; LedgerError (naming it) if it cannot be trusted."""
    path = Path(path)
    match = V1_NAME_RE.match(path.name)
    if not match:
        raise LedgerError(f"{path}: not a version-1 ledger file name (ledger-<dataset-id>.json)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise LedgerError(f"old privacy ledger {path} is unreadable ({exc}); restore it from a backup") from exc
    body = doc.get("body") if isinstance(doc, dict) else None
    if not isinstance(body, dict) or doc.get("sha256") != checksum(body):
        raise LedgerError(f"old privacy ledger {path} failed its checksum (edited or damaged); restore it")
    if body.get("format") != V1_FORMAT or body.get("version") != 1 or body.get("dataset_id") != match.group(1):
        raise LedgerError(f"{path}: not a version-1 fedimaging privacy ledger of dataset {match.group(1)!r}")
    acc = body.get("accountant")
    if not isinstance(acc, dict) or not isinstance(acc.get("mechanism"), str):
        raise LedgerError(f"{path}: accountant state missing")
    entries, pending = body.get("entries", []), body.get("pending", [])
    if not isinstance(entries, list) or not isinstance(pending, list):
        raise LedgerError(f"{path}: 'entries' and 'pending' must be lists")
    segments = []
    for raw in [*entries, *pending]:
        if not isinstance(raw, dict) or not isinstance(raw.get("run_id"), str):
            raise LedgerError(f"{path}: bad ledger entry {raw!r}")
        segments.append((
            raw["run_id"],
            float(number(raw.get("noise_multiplier"), "noise multiplier", path)),
            float(number(raw.get("sample_rate"), "sample rate", path, upper=1.0)),
            int(number(raw.get("steps"), "steps", path, integer=True)),
        ))
    history = acc.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 3 for h in history):
        raise LedgerError(f"{path}: bad accountant history")
    settled = sum(int(number(h[2], "steps", path, integer=True)) for h in history)
    if settled != sum(s[3] for s in segments[: len(entries)]):
        raise LedgerError(f"{path}: entries and accountant history disagree on the step count")
    return V1Ledger(path, match.group(1), acc["mechanism"], segments)
