"""Site-owned privacy ledger: the lifetime DP-SGD spend on one dataset, across rounds and runs.

Flower's Opacus example makes a new PrivacyEngine every round, so the epsilon it reports is per
round and resets on every restart. Here the site keeps one ledger file per dataset in its private
state folder. It holds the state of an Opacus accountant (``state_dict``: the ``history`` of
``(noise_multiplier, sample_rate, steps)``), so the epsilon spent is always recomputed by Opacus
from everything this dataset ever went through, whatever run or process spent it.

File: ``<state-dir>/privacy/ledger-<dataset_id>.json`` (written atomically, with a SHA-256 checksum
of its content so a hand edit or a torn copy is an error, never a silent reset to zero). A lock
file serialises concurrent writers (two runs on the same dataset at once): ``record`` re-reads
the file under the lock and appends, so no spend is ever lost.

A round is charged before it runs: ``reserve`` books its planned steps as *pending* (counted in
``spent``), ``settle`` replaces the booking by the steps actually taken. A process that dies
mid-round leaves its booking in place, so a crash can only over-count, never under-count.
The checksum protects against accidents, not against a site that wants to cheat itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedimaging.io import atomic_write_json

LEDGER_FORMAT = "fedimaging-privacy-ledger"
LEDGER_VERSION = 1
DEFAULT_MECHANISM = "rdp"
"""Opacus RDP accountant: composes any heterogeneous history exactly, is deterministic and never
fails on extreme parameters (PRV is slightly tighter but numerically fragile on mixed histories)."""

_DATASET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class LedgerError(RuntimeError):
    """The ledger file cannot be trusted (corrupt, edited, wrong dataset or format)."""


def dataset_id_from_training_list(training: Sequence[Any], name: str = "") -> str:
    """Identifier of a site dataset: SHA-256 of its training list (dataset.json ``training``).

    Stable across runs and restarts; changes only when the training cases change. It is a site
    secret (it stays in the state folder, never in metrics).
    """
    blob = json.dumps({"name": name, "training": list(training)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def dataset_id_for(data_path: str | os.PathLike) -> str:
    """Dataset identifier read from ``<data_path>/dataset.json`` (see dataset_id_from_training_list)."""
    manifest = Path(data_path) / "dataset.json"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        training = meta["training"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"cannot read the training list from {manifest}: {exc}") from exc
    if not isinstance(training, list):
        raise LedgerError(f"{manifest}: 'training' must be a list")
    return dataset_id_from_training_list(training, str(meta.get("name", "")))


def default_delta(num_training_cases: int) -> float:
    """``min(1e-5, 1/(10 N))``: delta must be well below 1/N (the chance of leaking one case)."""
    if num_training_cases <= 0:
        raise ValueError(f"number of training cases must be positive, got {num_training_cases}")
    return min(1e-5, 1.0 / (10.0 * num_training_cases))


def ledger_path(state_dir: str | os.PathLike, dataset_id: str) -> Path:
    """Where the ledger of ``dataset_id`` lives under ``state_dir``."""
    if not isinstance(dataset_id, str) or not _DATASET_ID_RE.match(dataset_id):
        raise ValueError(
            f"dataset_id must be 1-128 characters of letters, digits, '_', '-', '.', got {dataset_id!r}"
        )
    return Path(state_dir) / "privacy" / f"ledger-{dataset_id}.json"


def _checksum(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path.lock`` (no-op where fcntl does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _positive_float(value: Any, what: str, where: Path, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LedgerError(f"{where}: {what} must be a finite number, got {value!r}")
    if value <= 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "positive"
        raise LedgerError(f"{where}: {what} must be {bound}, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LedgerError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


@dataclass
class LedgerEntry:
    """Steps one run spent with one (noise multiplier, sample rate); rounds counts record() calls."""

    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    epsilon_after: float
    delta: float
    updated: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


class PrivacyLedger:
    """Lifetime (epsilon, delta) spend of one dataset, backed by an Opacus accountant.

    Use :meth:`load` (creates an empty ledger if the file does not exist yet), query with
    :meth:`spent` / :meth:`would_exceed`, and :meth:`record` the steps actually taken (which saves).
    """

    def __init__(self, path: Path, dataset_id: str, mechanism: str = DEFAULT_MECHANISM):
        self.path = Path(path)
        self.dataset_id = dataset_id
        self.mechanism = mechanism
        self.accountant = create_accountant(mechanism=mechanism)
        self.entries: list[LedgerEntry] = []
        self.pending: list[dict] = []
        self.epsilon_budget: float | None = None
        self.delta: float | None = None

    # ----------------------------------------------------------------- loading / saving
    @classmethod
    def load(
        cls, state_dir: str | os.PathLike, dataset_id: str, mechanism: str = DEFAULT_MECHANISM
    ) -> PrivacyLedger:
        """Ledger of ``dataset_id`` in ``state_dir``; an empty one if none was written yet."""
        ledger = cls(ledger_path(state_dir, dataset_id), dataset_id, mechanism)
        ledger.reload()
        return ledger

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PrivacyLedger:
        """Open an existing ledger file (for inspection, e.g. ``fedimaging privacy show``)."""
        path = Path(path)
        match = re.match(r"^ledger-(.+)\.json$", path.name)
        if not match:
            raise LedgerError(f"{path}: not a ledger file name (expected ledger-<dataset-id>.json)")
        try:
            mechanism = json.loads(path.read_text(encoding="utf-8"))["body"]["accountant"]["mechanism"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"{path}: unreadable privacy ledger ({exc})") from exc
        ledger = cls(path, match.group(1), str(mechanism))
        ledger.reload()
        return ledger

    def reload(self) -> None:
        """Re-read the file (an absent file means nothing spent yet); raises LedgerError if bad."""
        if not self.path.exists():
            self.accountant.history = []
            self.entries = []
            self.pending = []
            return
        where = self.path
        try:
            doc = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LedgerError(
                f"privacy ledger {where} is unreadable ({exc}); refusing to train. Restore it from "
                f"a backup; deleting it would forget the privacy budget already spent."
            ) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
            raise LedgerError(f"{where}: not a fedimaging privacy ledger")
        body = doc["body"]
        if doc.get("sha256") != _checksum(body):
            raise LedgerError(
                f"privacy ledger {where} failed its checksum (edited by hand or damaged); "
                f"refusing to train. Restore it from a backup."
            )
        if body.get("format") != LEDGER_FORMAT or body.get("version") != LEDGER_VERSION:
            raise LedgerError(
                f"{where}: unsupported ledger format {body.get('format')!r} version {body.get('version')!r}"
            )
        if body.get("dataset_id") != self.dataset_id:
            raise LedgerError(
                f"{where}: belongs to dataset {body.get('dataset_id')!r}, expected {self.dataset_id!r}"
            )
        acc_state = body.get("accountant")
        if not isinstance(acc_state, dict) or acc_state.get("mechanism") != self.mechanism:
            raise LedgerError(
                f"{where}: accountant mechanism {acc_state and acc_state.get('mechanism')!r} "
                f"does not match {self.mechanism!r}"
            )
        history = []
        for item in acc_state.get("history", None) or []:
            if not isinstance(item, list) or len(item) != 3:
                raise LedgerError(f"{where}: bad accountant history item {item!r}")
            sigma = _positive_float(item[0], "noise multiplier", where)
            q = _positive_float(item[1], "sample rate", where, upper=1.0)
            history.append((sigma, q, _positive_int(item[2], "steps", where)))
        entries = []
        for raw in body.get("entries", []):
            try:
                entries.append(LedgerEntry(**raw))
            except TypeError as exc:
                raise LedgerError(f"{where}: bad ledger entry {raw!r}") from exc
        if sum(e.steps for e in entries) != sum(h[2] for h in history):
            raise LedgerError(f"{where}: entries and accountant history disagree on the step count")
        pending = []
        for raw in body.get("pending", []):
            if not isinstance(raw, dict) or set(raw) != {"id", "run_id", "noise_multiplier", "sample_rate", "steps"}:
                raise LedgerError(f"{where}: bad pending reservation {raw!r}")
            _positive_float(raw["noise_multiplier"], "noise multiplier", where)
            _positive_float(raw["sample_rate"], "sample rate", where, upper=1.0)
            _positive_int(raw["steps"], "steps", where)
            pending.append(dict(raw))
        state = {"history": history, "mechanism": self.mechanism}
        fresh = create_accountant(mechanism=self.mechanism)
        fresh.load_state_dict(state)
        self.accountant = fresh
        self.entries = entries
        self.pending = pending
        self.epsilon_budget = body.get("epsilon_budget")
        self.delta = body.get("delta")

    def save(self) -> None:
        """Write the ledger atomically (temporary file + rename, mode 0600)."""
        state = self.accountant.state_dict()
        body = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "dataset_id": self.dataset_id,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": {
                "mechanism": state["mechanism"],
                "history": [[float(s), float(q), int(n)] for s, q, n in state["history"]],
            },
            "entries": [e.to_json() for e in self.entries],
            "pending": [dict(p) for p in self.pending],
        }
        atomic_write_json(self.path, {"body": body, "sha256": _checksum(body)}, mode=0o600)

    # ----------------------------------------------------------------- accounting
    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus accountant history: ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return list(self.accountant.history)

    @property
    def charged_history(self) -> list[tuple[float, float, int]]:
        """History plus pending reservations: everything that counts against the budget."""
        extra = [(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in self.pending]
        return self.history + extra

    @property
    def total_steps(self) -> int:
        """Steps charged so far (settled and pending)."""
        return sum(int(n) for _, _, n in self.charged_history)

    def spent(self, delta: float) -> float:
        """Lifetime epsilon charged to this dataset at ``delta`` (0.0 before any step)."""
        return epsilon_of(self.charged_history, delta, self.mechanism)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Lifetime epsilon after ``steps`` more steps at (noise_multiplier, sample_rate)."""
        extra = [(noise_multiplier, sample_rate, steps)] if steps > 0 else []
        return epsilon_of(self.charged_history + extra, delta, self.mechanism)

    def would_exceed(
        self, noise_multiplier: float, sample_rate: float, steps: int, epsilon_budget: float, delta: float
    ) -> bool:
        """True if taking ``steps`` more steps would push the lifetime epsilon above the budget."""
        return self.epsilon_if(noise_multiplier, sample_rate, steps, delta) > epsilon_budget * (1 + 1e-9)

    def record(
        self,
        run_id: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        epsilon_budget: float | None = None,
    ) -> float:
        """Add ``steps`` taken by ``run_id`` and save; returns the lifetime epsilon after them.

        The file is re-read under a lock first, so concurrent runs on the same dataset both count.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        with _locked(self.path):
            self.reload()
            return self._record_locked(run_id, noise_multiplier, sample_rate, steps, delta, epsilon_budget)

    def _record_locked(
        self, run_id: str, noise_multiplier: float, sample_rate: float, steps: int,
        delta: float, epsilon_budget: float | None,
    ) -> float:
        """Append under the caller's lock and save; returns lifetime epsilon after."""
        if steps > 0:
            self._append_history(noise_multiplier, sample_rate, steps)
        epsilon = self.spent(delta)
        last = self.entries[-1] if self.entries else None
        if (
            last is not None
            and last.run_id == run_id
            and last.noise_multiplier == noise_multiplier
            and last.sample_rate == sample_rate
        ):
            last.steps += steps
            last.rounds += 1
            last.epsilon_after = epsilon
            last.delta = delta
            last.updated = time.time()
        elif steps > 0:
            self.entries.append(
                LedgerEntry(run_id, float(noise_multiplier), float(sample_rate), int(steps), 1,
                            epsilon, float(delta), time.time())
            )
        self.delta = float(delta)
        if epsilon_budget is not None:
            self.epsilon_budget = float(epsilon_budget)
        self.save()
        return epsilon

    def reserve(
        self, run_id: str, noise_multiplier: float, sample_rate: float, steps: int,
        epsilon_budget: float, delta: float,
    ) -> str | None:
        """Book ``steps`` planned steps before a round; returns a reservation id.

        Returns None (and books nothing) if they would push the lifetime epsilon over the budget.
        """
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        with _locked(self.path):
            self.reload()
            if self.would_exceed(noise_multiplier, sample_rate, steps, epsilon_budget, delta):
                return None
            reservation = hashlib.sha256(
                f"{run_id}:{time.time_ns()}:{os.getpid()}:{self.total_steps}".encode()
            ).hexdigest()[:16]
            self.pending.append({
                "id": reservation, "run_id": run_id, "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate), "steps": int(steps),
            })
            self.delta = float(delta)
            self.epsilon_budget = float(epsilon_budget)
            self.save()
        return reservation

    def settle(self, reservation: str, steps: int, delta: float) -> float:
        """Replace a reservation by the ``steps`` actually taken; returns lifetime epsilon after."""
        with _locked(self.path):
            self.reload()
            booked = [p for p in self.pending if p["id"] == reservation]
            if not booked:
                raise LedgerError(f"{self.path}: no pending reservation {reservation!r}")
            if steps > booked[0]["steps"]:
                raise ValueError(f"{steps} steps taken but only {booked[0]['steps']} were reserved")
            self.pending = [p for p in self.pending if p["id"] != reservation]
            return self._record_locked(
                booked[0]["run_id"], booked[0]["noise_multiplier"], booked[0]["sample_rate"], steps, delta, None
            )

    def _append_history(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        history = self.history
        if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
            history[-1] = (history[-1][0], history[-1][1], history[-1][2] + int(steps))
        else:
            history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        self.accountant.history = history


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one step at the accountant's default orders (the slow part: cached)."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.setflags(write=False)
    return rdp


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float, mechanism: str = DEFAULT_MECHANISM) -> float:
    """Epsilon of an accountant history at ``delta``, as Opacus' accountant computes it.

    For RDP this is exactly ``RDPAccountant.get_privacy_spent`` (same orders, same functions; RDP
    is linear in the steps), with the per-step RDP of each (sigma, q) cached, since calibration
    evaluates many histories that share a prefix.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not history:
        return 0.0
    if mechanism == "rdp":
        rdp = sum(_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in history)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for tiny epsilons
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))


def format_ledger(ledger: PrivacyLedger, epsilon_budget: float | None = None, delta: float | None = None) -> str:
    """Human-readable table of a ledger: one line per run segment, then the totals."""
    budget = epsilon_budget if epsilon_budget is not None else ledger.epsilon_budget
    delta = delta if delta is not None else ledger.delta
    lines = [f"Privacy ledger {ledger.path}", f"dataset {ledger.dataset_id}  accountant {ledger.mechanism}"]
    header = f"{'run':<28} {'rounds':>6} {'steps':>7} {'sigma':>9} {'q':>8} {'eps after':>10}"
    lines += [header, "-" * len(header)]
    for e in ledger.entries:
        lines.append(
            f"{e.run_id[:28]:<28} {e.rounds:>6} {e.steps:>7} {e.noise_multiplier:>9.4f} "
            f"{e.sample_rate:>8.4f} {e.epsilon_after:>10.3f}"
        )
    for p in ledger.pending:
        lines.append(
            f"{p['run_id'][:28]:<28} {'(open)':>6} {p['steps']:>7} {p['noise_multiplier']:>9.4f} "
            f"{p['sample_rate']:>8.4f} {'counted':>10}"
        )
    if not ledger.entries and not ledger.pending:
        lines.append("(no DP training recorded)")
    lines.append("-" * len(header))
    spent = ledger.spent(delta) if delta else 0.0
    budget_txt = f"{budget:.3f}" if budget is not None else "unknown"
    delta_txt = f"{delta:.3g}" if delta else "unknown"
    lines.append(f"total steps {ledger.total_steps}; epsilon spent {spent:.3f} of {budget_txt} (delta {delta_txt})")
    return "\n".join(lines)


def ledger_summary(ledger: PrivacyLedger, epsilon_budget: float | None = None, delta: float | None = None) -> dict:
    """JSON-ready summary of a ledger (for ``privacy show --json``)."""
    budget = epsilon_budget if epsilon_budget is not None else ledger.epsilon_budget
    delta = delta if delta is not None else ledger.delta
    spent = ledger.spent(delta) if delta else None
    return {
        "dataset_id": ledger.dataset_id,
        "path": str(ledger.path),
        "mechanism": ledger.mechanism,
        "epsilon_budget": budget,
        "delta": delta,
        "epsilon_spent": spent,
        "epsilon_remaining": (max(0.0, budget - spent) if budget is not None and spent is not None else None),
        "total_steps": ledger.total_steps,
        "runs": [e.to_json() for e in ledger.entries],
        "open_rounds": [dict(p) for p in ledger.pending],
    }
