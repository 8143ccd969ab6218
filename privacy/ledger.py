"""The site's privacy ledger: every DP-SGD release, and the cases and patients it touched.

One ledger per site state folder, ``<state-dir>/privacy/ledger.json`` (version 2). Each
*release* is a run of DP-SGD steps at one (noise multiplier, sample rate) over one training set;
it lists the hashed privacy units of that set (see :mod:`privacy.units`). What a case has spent is
the Opacus RDP epsilon of every release that touched it, whichever dataset folder, dataset name or
run it came through; what a new training costs is the worst case over its cases. Adding cases,
renaming the dataset or re-running prep therefore never resets anyone's budget (version 1 keyed
the budget to the training list, and did).

A round is charged before it runs: ``reserve`` books its planned steps as an *open* release
(counted), ``settle`` records the steps actually taken, so a crash can only over-count. A lock
file serialises concurrent writers; every change re-reads the file under the lock.

``privacy/ledger.marker`` is written with the ledger's id when the ledger is created and never
removed: a missing ``ledger.json`` beside a marker is an error, not a fresh start. The SHA-256
checksum and the marker catch accidents (a torn copy, a hand edit, a deleted file); they cannot
stop a site that deletes its whole state folder, which owns its budget (README "Differential
privacy").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedimaging.io import atomic_write_json
from privacy.accounting import DEFAULT_MECHANISM, epsilon_of, worst_epsilon
from privacy.ledger_v1 import V1_NAME_RE, LedgerError, V1Ledger, checksum, number

__all__ = ["DEFAULT_MECHANISM", "LedgerError", "PrivacyLedger", "Release", "default_delta", "epsilon_of"]

LEDGER_FORMAT = "fedimaging-site-privacy-ledger"
LEDGER_VERSION = 2
LEDGER_FILE = "ledger.json"
MARKER_FILE = "ledger.marker"
_UNIT_RE = re.compile(r"^(case|subject):[0-9a-f]{32}$")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_RUN_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def default_delta(num_training_cases: int) -> float:
    """``min(1e-5, 1/(10 N))``: delta must be well below 1/N (the chance of leaking one case)."""
    if num_training_cases <= 0:
        raise ValueError(f"number of training cases must be positive, got {num_training_cases}")
    return min(1e-5, 1.0 / (10.0 * num_training_cases))


@dataclass
class Release:
    """Steps one run took at one (sigma, q) on one training set; ``open`` until its round settles."""

    id: str
    run_id: str
    units: int  # index into PrivacyLedger.unit_sets
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    open: bool
    study_epsilon: float | None
    updated: float

    @property
    def segment(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path.lock`` (no-op where fcntl does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path.with_suffix(path.suffix + ".lock"), "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class PrivacyLedger:
    """All DP-SGD releases of one site state folder. :meth:`load`, query, :meth:`reserve`/:meth:`settle`."""

    def __init__(self, state_dir: str | os.PathLike, mechanism: str | None = None):
        self.dir = Path(state_dir) / "privacy"
        self.path = self.dir / LEDGER_FILE
        self.marker_path = self.dir / MARKER_FILE
        self.mechanism = mechanism or DEFAULT_MECHANISM
        self._expected_mechanism = mechanism
        self._clear()

    def _clear(self) -> None:
        self.ledger_id: str | None = None
        self.releases: list[Release] = []
        self.unit_sets: list[tuple[str, ...]] = []
        self.epsilon_budget: float | None = None
        self.delta: float | None = None
        self.migrated: list[dict] = []
        self._index: dict[str, set[int]] | None = None

    @classmethod
    def load(cls, state_dir: str | os.PathLike, mechanism: str | None = None) -> PrivacyLedger:
        """The ledger of ``state_dir`` (empty if DP never ran there); LedgerError if it cannot be trusted."""
        ledger = cls(state_dir, mechanism)
        ledger.reload()
        return ledger

    def legacy_files(self) -> list[Path]:
        """Version-1 ledgers (``ledger-<dataset id>.json``) still in the folder, not yet migrated."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if V1_NAME_RE.match(p.name))

    # ----------------------------------------------------------------- reading / writing
    def _marker_id(self) -> str | None:
        if not self.marker_path.exists():
            return None
        try:
            marker = json.loads(self.marker_path.read_text(encoding="utf-8"))
            ident = marker["ledger_id"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"privacy ledger marker {self.marker_path} is damaged ({exc}); restore it") from exc
        if not isinstance(ident, str) or not _ID_RE.match(ident):
            raise LedgerError(f"privacy ledger marker {self.marker_path} is damaged (bad ledger_id)")
        return ident

    def reload(self) -> None:
        """Re-read the file; raises LedgerError (naming it) if it is missing after use, damaged or foreign."""
        marker = self._marker_id()
        if not self.path.exists():
            if marker is not None:
                raise LedgerError(
                    f"privacy ledger {self.path} is missing, but {self.marker_path} shows that ledger "
                    f"{marker} recorded DP training here: the epsilon spent on this site's cases is "
                    f"unknown, so training is refused. Restore {self.path.name} from a backup of the "
                    f"state folder (see README 'Differential privacy')."
                )
            self._clear()
            return
        where = self.path
        try:
            doc = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise LedgerError(
                f"privacy ledger {where} is unreadable ({exc}); refusing to train. Restore it from a "
                f"backup; deleting it would forget the privacy budget already spent."
            ) from exc
        body = doc.get("body") if isinstance(doc, dict) else None
        if not isinstance(body, dict):
            raise LedgerError(f"{where}: not a fedimaging privacy ledger")
        try:
            digest_ok = doc.get("sha256") == checksum(body)
        except (TypeError, ValueError):
            digest_ok = False
        if not digest_ok:
            raise LedgerError(
                f"privacy ledger {where} failed its checksum (edited by hand or damaged); "
                f"refusing to train. Restore it from a backup."
            )
        self._parse(body, where)
        if marker is not None and marker != self.ledger_id:
            raise LedgerError(
                f"{where} is ledger {self.ledger_id}, but {self.marker_path} names ledger {marker}: "
                f"a ledger copied from elsewhere; restore this state folder's own ledger"
            )

    def _parse(self, body: dict, where: Path) -> None:
        if body.get("format") != LEDGER_FORMAT or body.get("version") != LEDGER_VERSION:
            raise LedgerError(
                f"{where}: unsupported ledger format {body.get('format')!r} version {body.get('version')!r}"
            )
        ident, mechanism = body.get("ledger_id"), body.get("mechanism")
        if not isinstance(ident, str) or not _ID_RE.match(ident):
            raise LedgerError(f"{where}: bad ledger_id {ident!r}")
        if not isinstance(mechanism, str) or (self._expected_mechanism not in (None, mechanism)):
            raise LedgerError(f"{where}: accountant {mechanism!r} does not match {self.mechanism!r}")
        budget, delta = body.get("epsilon_budget"), body.get("delta")
        if budget is not None:
            number(budget, "epsilon_budget", where)
        if delta is not None:
            number(delta, "delta", where, upper=0.5)
        sets = body.get("unit_sets")
        if not isinstance(sets, list) or not all(
            isinstance(s, list) and s and all(isinstance(k, str) and _UNIT_RE.match(k) for k in s) for s in sets
        ):
            raise LedgerError(f"{where}: 'unit_sets' must be lists of hashed case/patient keys")
        raw_releases, migrated = body.get("releases"), body.get("migrated", [])
        if not isinstance(raw_releases, list) or not isinstance(migrated, list):
            raise LedgerError(f"{where}: 'releases' and 'migrated' must be lists")
        releases = [self._release(raw, where, len(sets)) for raw in raw_releases]
        if not all(isinstance(m, dict) for m in migrated):
            raise LedgerError(f"{where}: bad 'migrated' item")
        self._clear()
        self.ledger_id, self.mechanism = ident, mechanism
        self.epsilon_budget = None if budget is None else float(budget)
        self.delta = None if delta is None else float(delta)
        self.unit_sets = [tuple(s) for s in sets]
        self.releases, self.migrated = releases, [dict(m) for m in migrated]

    @staticmethod
    def _release(raw: Any, where: Path, n_sets: int) -> Release:
        fields = set(Release.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) != fields:
            raise LedgerError(f"{where}: bad release {str(raw)[:200]}")
        ok = (
            isinstance(raw["id"], str) and isinstance(raw["run_id"], str) and _RUN_RE.match(raw["run_id"])
            and type(raw["units"]) is int and 0 <= raw["units"] < n_sets
            and type(raw["steps"]) is int and raw["steps"] >= (1 if raw["open"] else 0)
            and type(raw["rounds"]) is int and raw["rounds"] >= 0 and isinstance(raw["open"], bool)
            and isinstance(raw["updated"], (int, float)) and not isinstance(raw["updated"], bool)
        )
        if not ok:
            raise LedgerError(f"{where}: bad release {str(raw)[:200]}")
        number(raw["noise_multiplier"], "noise multiplier", where)
        number(raw["sample_rate"], "sample rate", where, upper=1.0)
        if raw["study_epsilon"] is not None:
            number(raw["study_epsilon"], "study epsilon", where)
        return Release(**raw)

    def save(self) -> None:
        """Write the ledger atomically (mode 0600); creates the marker first for a new ledger."""
        if self.ledger_id is None:
            self.ledger_id = secrets.token_hex(16)
        if self._marker_id() is None:
            atomic_write_json(self.marker_path, {"ledger_id": self.ledger_id, "created": time.time()}, mode=0o600)
        body = {
            "format": LEDGER_FORMAT, "version": LEDGER_VERSION, "ledger_id": self.ledger_id,
            "mechanism": self.mechanism, "epsilon_budget": self.epsilon_budget, "delta": self.delta,
            "unit_sets": [list(s) for s in self.unit_sets],
            "releases": [asdict(r) for r in self.releases], "migrated": self.migrated,
        }
        atomic_write_json(self.path, {"body": body, "sha256": checksum(body)}, mode=0o600)
        self._index = None

    # ----------------------------------------------------------------- accounting
    def _key_index(self) -> dict[str, set[int]]:
        if self._index is None:
            index: dict[str, set[int]] = {}
            for i, release in enumerate(self.releases):
                if release.steps > 0:
                    for key in self.unit_sets[release.units]:
                        index.setdefault(key, set()).add(i)
            self._index = index
        return self._index

    def case_histories(self, cases: Sequence[Sequence[str]]) -> list[list[tuple[float, float, int]]]:
        """The distinct histories of ``cases`` (each: every release that touched one of its keys)."""
        index = self._key_index()
        groups = {frozenset().union(*(index.get(k, ()) for k in keys)) for keys in cases}
        return [[self.releases[i].segment for i in sorted(g)] for g in groups]

    def spent(self, cases: Sequence[Sequence[str]], delta: float) -> float:
        """Lifetime epsilon of the worst-off of ``cases`` at ``delta`` (0.0 if none was ever trained)."""
        return worst_epsilon(self.case_histories(cases), delta, self.mechanism)

    def spent_anywhere(self, delta: float) -> float:
        """The largest epsilon any one recorded case or patient has spent (no dataset needed)."""
        return self.spent([(k,) for k in self._key_index()], delta)

    def study_history(self, run_id: str) -> list[tuple[float, float, int]]:
        """Everything one study (run key) has released here, settled or open."""
        return [r.segment for r in self.releases if r.run_id == run_id]

    @property
    def total_steps(self) -> int:
        return sum(r.steps for r in self.releases)

    def excess(
        self, cases: Sequence[Sequence[str]], segment: tuple[float, float, int], *, epsilon_budget: float,
        delta: float, run_id: str | None = None, study_epsilon: float | None = None,
    ) -> str | None:
        """``"lifetime"`` or ``"study"`` if ``segment`` more would overspend that budget, else None."""
        histories = [h + [segment] for h in self.case_histories(cases)]
        if worst_epsilon(histories, delta, self.mechanism) > epsilon_budget * (1 + 1e-9):
            return "lifetime"
        if study_epsilon is not None and run_id is not None:
            if epsilon_of(self.study_history(run_id) + [segment], delta, self.mechanism) > study_epsilon * (1 + 1e-9):
                return "study"
        return None

    def _unit_set(self, cases: Sequence[Sequence[str]]) -> int:
        keys = tuple(sorted({k for keys in cases for k in keys}))
        if not keys or not all(_UNIT_RE.match(k) for k in keys):
            raise ValueError("a release needs the hashed unit keys of its cases (privacy.units.case_units)")
        if keys not in self.unit_sets:
            self.unit_sets.append(keys)
        return self.unit_sets.index(keys)

    def reserve(
        self, run_id: str, cases: Sequence[Sequence[str]], noise_multiplier: float, sample_rate: float,
        steps: int, *, epsilon_budget: float, delta: float, study_epsilon: float | None = None,
    ) -> tuple[str | None, str | None]:
        """Book ``steps`` planned steps: ``(reservation id, None)``, or ``(None, "lifetime"|"study")``."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        if not _RUN_RE.match(run_id):
            raise ValueError(f"run id {run_id!r}: letters, digits, '.', '_', ':', '-' only")
        with _locked(self.path):
            self.reload()
            over = self.excess(cases, (noise_multiplier, sample_rate, steps), epsilon_budget=epsilon_budget,
                               delta=delta, run_id=run_id, study_epsilon=study_epsilon)
            if over is not None:
                return None, over
            reservation = secrets.token_hex(8)
            self.releases.append(Release(
                reservation, run_id, self._unit_set(cases), float(noise_multiplier), float(sample_rate),
                int(steps), 0, True, None if study_epsilon is None else float(study_epsilon), time.time(),
            ))
            self.epsilon_budget, self.delta = float(epsilon_budget), float(delta)
            self.save()
        return reservation, None

    def settle(self, reservation: str, steps: int) -> None:
        """Replace a reservation by the ``steps`` actually taken (merged into the run's last release)."""
        with _locked(self.path):
            self.reload()
            at = next((i for i, r in enumerate(self.releases) if r.id == reservation and r.open), None)
            if at is None:
                raise LedgerError(f"{self.path}: no open reservation {reservation!r}")
            booked = self.releases[at]
            if not 0 <= steps <= booked.steps:
                raise ValueError(f"{steps} steps taken but {booked.steps} were reserved")
            booked.steps, booked.rounds, booked.open, booked.updated = int(steps), 1, False, time.time()
            prior = next((r for r in reversed(self.releases[:at]) if not r.open and r.run_id == booked.run_id), None)
            if prior is not None and (prior.noise_multiplier, prior.sample_rate, prior.units) == (
                booked.noise_multiplier, booked.sample_rate, booked.units
            ):
                prior.steps, prior.rounds, prior.updated = prior.steps + booked.steps, prior.rounds + 1, booked.updated
                del self.releases[at]
            self.save()

    def absorb_v1(self, old: V1Ledger, cases: Sequence[Sequence[str]], file_digest: str) -> None:
        """Charge a version-1 ledger's whole history to ``cases`` (each of them spent all of it)."""
        with _locked(self.path):
            self.reload()
            if any(m.get("sha256") == file_digest for m in self.migrated):
                return  # already absorbed (a crash before the old file was renamed)
            if self._expected_mechanism not in (None, old.mechanism) or (self.releases and old.mechanism != self.mechanism):
                raise LedgerError(f"{old.path}: accountant {old.mechanism!r} does not match {self.mechanism!r}")
            self.mechanism = old.mechanism
            units = self._unit_set(cases)
            for run_id, sigma, q, steps in old.segments:
                run = run_id if _RUN_RE.match(run_id) else "v1-run"
                self.releases.append(Release(secrets.token_hex(8), run, units, sigma, q, steps, 0, False, None, time.time()))
            self.migrated.append({"file": old.path.name, "sha256": file_digest, "cases": len(cases),
                                  "steps": sum(s[3] for s in old.segments), "when": time.time()})
            self.save()
