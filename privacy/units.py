"""Who a DP-SGD step protects: the privacy units (cases, and the patients behind them) of a site.

The ledger charges epsilon to units, not to a dataset, so the budget follows the patients: a case
keeps what it spent when other cases are added, when the dataset is renamed or re-prepared.

Each training case has one or two unit keys:

- ``case:<hash>`` of the case name, the image file stem in ``dataset.json`` (for ``fedimaging
  prep`` output a keyed pseudonym of the source series, so re-running prep with the same
  ``private/site_secret.key`` gives the same names);
- ``subject:<hash>`` of the patient pseudonym in ``sidecars/<case>.json`` when prep wrote one, so
  two series of one patient used in two studies compose as one person.

A case's history is every release that touched any of its keys. Keys are SHA-256 hashes: the
ledger holds no case name. Renaming a case's files by hand gives it a new key (a fresh budget).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from privacy.ledger_v1 import LedgerError

_SUBJECT_RE = re.compile(r"^[0-9A-Za-z_-]{6,64}$")
_MAX_SIDECAR_BYTES = 256 * 1024
FILE_ENDINGS = (".nii.gz", ".nii")

CaseUnits = tuple[str, ...]


def unit_key(kind: str, value: str) -> str:
    """``<kind>:<32 hex>``: the hash the ledger stores for a case name or patient pseudonym."""
    digest = hashlib.sha256(f"fedimaging-privacy-unit\x00{kind}\x00{value}".encode()).hexdigest()
    return f"{kind}:{digest[:32]}"


def case_name_of(image_rel: str) -> str:
    """The case name of a dataset.json image path (file stem without ``_0000`` and the ending)."""
    base = Path(image_rel).name
    for suffix in FILE_ENDINGS:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base[:-5] if base.endswith("_0000") else base


def _subject_of(root: Path, case: str) -> str | None:
    """The patient pseudonym prep wrote for ``case``, or None (no sidecar, or one we cannot trust)."""
    sidecar = root / "sidecars" / f"{case}.json"
    try:
        resolved = sidecar.resolve()
        if root.resolve() not in resolved.parents or not resolved.is_file():
            return None
        if resolved.stat().st_size > _MAX_SIDECAR_BYTES:
            return None
        meta = json.loads(resolved.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    subject = meta.get("subject") if isinstance(meta, dict) else None
    return subject if isinstance(subject, str) and _SUBJECT_RE.match(subject) else None


def case_units(root: str | os.PathLike, case_names: Sequence[str]) -> list[CaseUnits]:
    """Unit keys of each training case, in order (one tuple per case)."""
    root = Path(root)
    out = []
    for name in case_names:
        keys = [unit_key("case", name)]
        subject = _subject_of(root, name)
        if subject is not None:
            keys.append(unit_key("subject", subject))
        out.append(tuple(keys))
    return out


def training_case_names(data_path: str | os.PathLike) -> list[str]:
    """Case names of ``<data_path>/dataset.json``'s training list (for tools outside training)."""
    manifest = Path(data_path) / "dataset.json"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        training = meta["training"]
        names = [case_name_of(entry["image"]) for entry in training]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise LedgerError(f"cannot read the training list from {manifest}: {exc}") from exc
    return names
