"""Server state and checkpoints: what a run needs to continue after a crash, and the best model.

After every round: ``checkpoints/last.pt``, ``checkpoints/best.pt`` on improvement of the best
metric, and ``server_state/`` (arrays as .pt, the rest as JSON; see ``RunDirectory``). Resume
reads it back into the strategy: the global model, the sampler's RNG, node -> site names, the
sites excluded from sampling, the best value, the metrics history, each variant's own state and
each extension's (central DP's noise secret and release count).
"""

from __future__ import annotations

import dataclasses
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.supercore import log

from .run_dir import load_server_state

if TYPE_CHECKING:
    from .base import FedImagingFedAvg

STATE_VERSION = 1


def best_candidate(strategy: FedImagingFedAvg) -> float | None:
    """This round's value of the best metric: the sites' aggregate, else the server's own."""
    metric = strategy.settings.best_metric
    pending = strategy.pending_evaluate or {}
    for source in (pending.get("aggregate") or {}, pending.get("server") or {}):
        value = source.get(metric)
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
    return None


def update_checkpoints(strategy: FedImagingFedAvg, rnd: int) -> None:
    """``last.pt`` every round; ``best.pt`` when the best metric improved."""
    assert strategy.global_arrays is not None
    s = strategy.settings
    strategy.run_dir.save_checkpoint("last", strategy.global_arrays)
    value = best_candidate(strategy)
    if value is None:
        return
    old = strategy.best.get("value")
    better = old is None or (value > old if s.higher_is_better else value < old)
    if better:
        strategy.best = {"metric": s.best_metric, "value": value, "round": rnd}
        strategy.run_dir.save_checkpoint("best", strategy.global_arrays)
        log(INFO, "New best %s=%.4f at round %d", s.best_metric, value, rnd)


def save(strategy: FedImagingFedAvg, rnd: int) -> None:
    """Everything needed to continue after round ``rnd`` (arrays .pt, the rest JSON)."""
    assert strategy.global_arrays is not None
    arrays = {"global": strategy.global_arrays, **strategy.server_state_arrays()}
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "strategy": strategy.settings.strategy,
        "settings": dataclasses.asdict(strategy.settings),
        "rng": strategy.sampler.state(),
        "node_sites": {str(k): v for k, v in sorted(strategy.screener.node_sites.items())},
        "excluded_from_sampling": dict(sorted(strategy.excluded_from_sampling.items())),
        "best": strategy.best,
        "history": {phase: {str(r): m for r, m in rows.items()} for phase, rows in strategy.history.items()},
        "extra": strategy.extra_state(),
    }
    for ext in strategy.extensions:
        state[ext.state_key] = ext.state()
    strategy.run_dir.save_server_state(rnd, arrays, state)


def restore(strategy: FedImagingFedAvg, root: str | Path) -> int:
    """Load the state saved in run directory ``root`` into ``strategy``; returns the last round done."""
    loaded = load_server_state(root)
    if loaded is None:
        raise FileNotFoundError(
            f"resume-from={str(root)!r} has no server_state/latest.json; is it a fedimaging run directory?"
        )
    rnd, arrays, state = loaded
    name = strategy.settings.strategy
    if state.get("strategy") != name:
        raise ValueError(
            f"resume-from={str(root)!r} was a '{state.get('strategy')}' run; cannot continue it with strategy={name!r}"
        )
    strategy.global_arrays = arrays["global"]
    if "initial" in arrays:
        strategy.initial_arrays = arrays["initial"]
    strategy.sampler.restore(state["rng"])
    strategy.screener.node_sites = {int(k): str(v) for k, v in state.get("node_sites", {}).items()}
    strategy.screener.excluded_from_sampling = dict(state.get("excluded_from_sampling", {}))
    strategy.best = dict(state.get("best", strategy.best))
    strategy.history = {phase: {int(r): m for r, m in rows.items()} for phase, rows in state.get("history", {}).items()}
    for phase in ("train", "evaluate", "server"):
        strategy.history.setdefault(phase, {})
    if "best-checkpoint" in arrays:  # the best model as of round rnd (see RunDirectory)
        strategy.run_dir.save_checkpoint("best", arrays["best-checkpoint"])
    strategy.run_dir.save_checkpoint("last", strategy.global_arrays)
    own = ("global", "initial", "best-checkpoint")
    strategy.restore_server_state_arrays({k: v for k, v in arrays.items() if k not in own})
    strategy.restore_extra_state(state.get("extra", {}))
    for ext in strategy.extensions:
        ext.restore(state.get(ext.state_key), str(root))
    strategy.round_offset = rnd
    return rnd
