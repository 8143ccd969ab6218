"""The run directory (DESIGN 3.5): every file the server writes for one run, written atomically.

Model files are weights-only torch state dicts (a dict of tensors, ``torch.load(p,
weights_only=True)``); everything else is JSON. Server state for resume lives in
``server_state/round-XXXXX/`` (arrays as .pt, the rest in ``state.json``) and
``server_state/latest.json`` names the newest complete one, so a crash while saving leaves the
previous state usable; ``server_state/initial.pt`` is the model the run started from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimaging.io import (
    append_line_durably,
    atomic_directory,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_json_object,
)
from fedimaging.weights import load_tensors

from .metrics import _plain

Arrays = dict[str, np.ndarray]


def arrays_to_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy arrays -> torch tensors (copied; key order kept)."""
    return {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in arrays.items()}


def save_weights(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically ``torch.save`` a dict of tensors (loadable with ``weights_only=True``)."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(arrays_to_state_dict(arrays), tmp)


def load_weights(path: str | Path) -> Arrays:
    """Load a weights-only state dict as numpy arrays; a clear error names the file."""
    return {k: v.detach().numpy() for k, v in load_tensors(path).items()}


def json_safe(obj: Any) -> Any:
    """Recursively convert to JSON-able values; non-finite floats become null."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, str):
        return obj
    return _plain(obj)


class RunDirectory:
    """Writer for one run directory (absolute path, created if missing)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_absolute():
            raise ValueError(f"run directory must be an absolute path, got {str(root)!r}")
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    # --- paths -------------------------------------------------------------------------
    @property
    def run_config_path(self) -> Path:
        return self.root / "run_config.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_model_path(self) -> Path:
        return self.root / "final_model.pt"

    @property
    def server_state_dir(self) -> Path:
        return self.root / "server_state"

    @property
    def cross_site_path(self) -> Path:
        return self.root / "cross_site.json"

    # --- small files ---------------------------------------------------------------------
    def write_run_config(self, config: Mapping[str, Any]) -> None:
        """Write the resolved run config."""
        atomic_write_json(self.run_config_path, json_safe(dict(config)))

    def write_cross_site(self, result: Mapping[str, Any]) -> None:
        atomic_write_json(self.cross_site_path, json_safe(dict(result)))

    @property
    def failure_path(self) -> Path:
        return self.root / "failed.json"

    def write_failure(self, reason: str) -> None:
        """``failed.json``: the run ended without a trained model, and why (the report reads it)."""
        atomic_write_json(self.failure_path, {"status": "failed", "reason": reason})

    # --- metrics.jsonl ---------------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line (fsynced)."""
        append_line_durably(self.metrics_path, json.dumps(json_safe(record), allow_nan=False))

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete lines of metrics.jsonl (a torn last line from a crash is skipped)."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def replace_metrics(self, records: list[Mapping[str, Any]]) -> None:
        """Atomically rewrite metrics.jsonl with ``records`` (used when resuming)."""
        text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)
        atomic_write_text(self.metrics_path, text)

    # --- model files ----------------------------------------------------------------------
    def save_checkpoint(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """``checkpoints/<name>.pt`` (``last`` every round, ``best`` on improvement)."""
        if name not in ("last", "best"):
            raise ValueError(f"checkpoint name must be 'last' or 'best', got {name!r}")
        path = self.checkpoints_dir / f"{name}.pt"
        save_weights(path, arrays)
        return path

    def save_final_model(self, arrays: Mapping[str, np.ndarray]) -> Path:
        save_weights(self.final_model_path, arrays)
        return self.final_model_path

    # --- server state ---------------------------------------------------------------------
    def save_server_state(
        self, server_round: int, arrays: Mapping[str, Mapping[str, np.ndarray]], state: Mapping[str, Any]
    ) -> Path:
        """Save the state after ``server_round``: ``arrays`` maps a name (``global``, ``adam-m``...)
        to an array dict saved as ``<name>.pt``; ``state`` goes to ``state.json``; the current
        ``checkpoints/best.pt`` is hard-linked in (no copy), so resuming restores the best model
        that belongs to this state even if a later round replaced best.pt before crashing.

        The folder is built aside and renamed into place, then ``latest.json`` is switched to it;
        older round folders are removed afterwards.
        """
        base = self.server_state_dir
        base.mkdir(parents=True, exist_ok=True)
        name = f"round-{server_round:05d}"
        target = base / name
        if target.exists():  # left over from an interrupted attempt at this round
            shutil.rmtree(target)
        with atomic_directory(target) as tmp:
            for key, arr in arrays.items():
                _check_name(key)
                save_weights(tmp / f"{key}.pt", arr)
            best = self.checkpoints_dir / "best.pt"
            if best.exists():
                try:
                    os.link(best, tmp / "best-checkpoint.pt")
                except OSError:  # filesystems without hard links
                    shutil.copyfile(best, tmp / "best-checkpoint.pt")
            atomic_write_json(
                tmp / "state.json",
                json_safe({"round": server_round, "arrays": sorted(arrays), **dict(state)}),
            )
        atomic_write_json(base / "latest.json", {"round": server_round, "folder": name})
        for old in base.glob("round-*"):
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def save_initial_model(self, arrays: Mapping[str, np.ndarray]) -> None:
        """``server_state/initial.pt``: the model the run started from (local baselines start here)."""
        save_weights(self.server_state_dir / "initial.pt", arrays)

    def load_server_state(self) -> tuple[int, dict[str, Arrays], dict[str, Any]] | None:
        """The newest saved server state, or None if this run directory has none."""
        return load_server_state(self.root)


def load_server_state(run_root: str | Path) -> tuple[int, dict[str, Arrays], dict[str, Any]] | None:
    """Read ``<run_root>/server_state`` -> ``(round, arrays_by_name, state)`` or None if absent."""
    base = Path(run_root) / "server_state"
    latest = base / "latest.json"
    if not latest.exists():
        return None
    try:
        folder = str(read_json_object(latest)["folder"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {latest}: {exc}") from None
    _check_name(folder)
    path = base / folder
    state_file = path / "state.json"
    if not state_file.exists():
        raise ValueError(f"server state {path} is incomplete (no state.json)")
    try:
        state = read_json_object(state_file)
        server_round = int(state["round"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {state_file}: {exc}") from None
    arrays: dict[str, Arrays] = {}
    for key in state.get("arrays", []):
        _check_name(key)
        arrays[key] = load_weights(path / f"{key}.pt")
    if (base / "initial.pt").exists():
        arrays["initial"] = load_weights(base / "initial.pt")
    if (path / "best-checkpoint.pt").exists():
        arrays["best-checkpoint"] = load_weights(path / "best-checkpoint.pt")
    if server_round < 0:
        raise ValueError(f"{state_file}: bad round {server_round}")
    return server_round, arrays, state


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad server-state entry name {name!r}")
