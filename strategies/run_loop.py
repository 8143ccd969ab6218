"""The run loop: start or resume, Flower's rounds, the end of each round, final outputs, cross-site.

The rounds themselves are Flower's ``Strategy.start`` (DESIGN 4); this module adds what happens
around it: resume from a run directory's server state, the end-of-round work that ``start``
calls through its ``evaluate_fn`` (metrics line, checkpoints, server state, periodic cross-site
evaluation, the console), the final model, and the final cross-site evaluation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from . import server_state
from .cross_site import run_cross_site
from .metrics import to_plain
from .records import to_numpy, to_record
from .run_dir import RunDirectory

if TYPE_CHECKING:
    from .base import FedImagingFedAvg

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


class NoSiteTrained(RuntimeError):
    """No site's update was accepted in any round: there is no trained model to write."""


def run(strategy: FedImagingFedAvg, grid: Grid, initial_arrays: ArrayRecord, *, num_rounds: int | None = None,
        train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None, resume_from: str | Path | None = None) -> Result:
    """Run (or resume) the whole federation and write the final outputs.

    Resume (``resume_from`` or ``settings.resume_from``: a run directory) restores the server
    state saved after round k and continues with round k+1 through Flower's ``Strategy.start``;
    ``metrics.jsonl`` keeps the lines of rounds <= k. A fresh run refuses a run directory that
    already holds server state.
    """
    s = strategy.settings
    num_rounds = s.num_server_rounds if num_rounds is None else int(num_rounds)
    strategy.num_rounds = num_rounds
    resume_root = resume_from if resume_from is not None else (s.resume_from or None)
    strategy.evaluate_config = ConfigRecord(dict(evaluate_config or {}))
    strategy.initial_arrays = to_numpy(initial_arrays)
    _check_model(strategy, strategy.initial_arrays)
    run_dir = strategy.run_dir
    log(INFO, "Run directory: %s", run_dir.root)
    done = 0
    if resume_root:
        done = strategy.restore_server_state(resume_root)
        _check_resume_model(strategy, initial_arrays)
        previous = RunDirectory(Path(resume_root).expanduser().resolve())
        kept = [r for r in previous.read_metrics() if int(r.get("round", 0)) <= done]
        run_dir.replace_metrics(kept)
        run_dir.save_initial_model(strategy.initial_arrays)
        log(INFO, "Resuming from %s after round %d (of %d)", resume_root, done, num_rounds)
        start_arrays = to_record(strategy.global_arrays or {})
    else:
        if run_dir.load_server_state() is not None:
            raise ValueError(
                f"run directory {run_dir.root} already holds a run; set resume-from to "
                "continue it or choose another run-dir"
            )
        strategy.global_arrays = dict(strategy.initial_arrays)
        run_dir.save_initial_model(strategy.initial_arrays)
        start_arrays = initial_arrays
    remaining = num_rounds - done
    if remaining > 0:
        strategy.driver.start(
            grid=grid,
            initial_arrays=start_arrays,
            num_rounds=remaining,
            timeout=s.round_timeout_s,
            train_config=ConfigRecord(dict(train_config or {})),
            evaluate_config=strategy.evaluate_config,
            evaluate_fn=functools.partial(end_of_round, strategy, grid, evaluate_fn),
        )
    else:
        log(INFO, "Nothing left to train: %d of %d rounds already done", done, num_rounds)
    finish(strategy)
    if s.cross_site:
        run_cross_site(strategy, grid, final=True, server_round=max(num_rounds, done))
    return result(strategy)


def end_of_round(strategy: FedImagingFedAvg, grid: Grid, user_fn: EvaluateFn | None, local_round: int,
                 arrays: ArrayRecord) -> MetricRecord | None:
    """Called by ``Strategy.start`` after each round (and once before the first)."""
    rnd = strategy.absolute_round(local_round)
    run_dir = strategy.run_dir
    if local_round == 0:
        if strategy.round_offset or user_fn is None:
            return None
        res = user_fn(0, arrays)
        if res is not None:
            strategy.history["server"][0] = to_plain(res)
            run_dir.append_metrics({"round": 0, "phase": "evaluate", "seconds": 0.0, "sites": {},
                                    "aggregate": {}, "excluded": {}, "server": to_plain(res)})
        return res
    strategy.global_arrays = to_numpy(arrays)
    res = None
    if user_fn is not None:
        t0 = time.monotonic()
        res = user_fn(rnd, arrays)
        if res is not None:
            strategy.history["server"][rnd] = to_plain(res)
            if strategy.pending_evaluate is None:
                strategy.pending_evaluate = {"round": rnd, "phase": "evaluate", "seconds": 0.0, "sites": {},
                                             "aggregate": {}, "excluded": {}}
            pending = strategy.pending_evaluate
            pending["server"] = to_plain(res)
            pending["seconds"] = round(pending["seconds"] + time.monotonic() - t0, 3)
    if strategy.pending_evaluate is not None:
        run_dir.append_metrics(strategy.pending_evaluate)
    if trained_rounds(strategy):  # a model no site trained is no checkpoint (and never the best)
        server_state.update_checkpoints(strategy, rnd)
    strategy.pending_evaluate = None
    every = strategy.settings.cross_site_every
    if every and rnd % every == 0 and rnd < strategy.num_rounds:
        run_cross_site(strategy, grid, final=False, server_round=rnd)
    strategy.save_server_state(rnd)
    if strategy.on_round_end is not None:
        strategy.on_round_end(rnd, [r for r in run_dir.read_metrics() if int(r.get("round", -1)) == rnd])
    return res


def trained_rounds(strategy: FedImagingFedAvg) -> list[int]:
    """Rounds in which at least one site's update was accepted (from metrics.jsonl's train lines)."""
    return [int(r["round"]) for r in strategy.run_dir.read_metrics()
            if r.get("phase") == "train" and _accepted_any(r)]


def _accepted_any(line: Mapping[str, Any]) -> bool:
    return any(site not in (line.get("excluded") or {}) for site in (line.get("sites") or {}))


def finish(strategy: FedImagingFedAvg) -> None:
    """Final model and checkpoints (best.pt falls back to the final model if no metric came).

    A run in which no site trained ends here as failed (:class:`NoSiteTrained`): no
    ``final_model.pt`` and no ``best.pt`` are written as if a model had been trained.
    """
    assert strategy.global_arrays is not None
    run_dir = strategy.run_dir
    if not trained_rounds(strategy):
        reasons = sorted({reason for r in run_dir.read_metrics() if r.get("phase") == "train"
                          for reason in (r.get("excluded") or {}).values()})
        message = ("no site trained in any round, so there is no federated model (no final_model.pt, "
                   f"no best.pt). Reasons the sites gave: {'; '.join(reasons[:5]) or 'none'}")
        run_dir.write_failure(message)
        log(WARNING, "Run failed: %s", message)
        raise NoSiteTrained(message)
    run_dir.save_final_model(strategy.global_arrays)
    run_dir.save_checkpoint("last", strategy.global_arrays)
    if not (run_dir.checkpoints_dir / "best.pt").exists():
        log(WARNING, "No '%s' was reported; best.pt is the final model", strategy.settings.best_metric)
        run_dir.save_checkpoint("best", strategy.global_arrays)
    log(INFO, "Run directory: %s", run_dir.root)


def result(strategy: FedImagingFedAvg) -> Result:
    """Flower Result with absolute round numbers (including rounds before a resume)."""
    def records(rows: Mapping[int, Mapping[str, Any]]) -> dict[int, MetricRecord]:
        out = {}
        for rnd, metrics in sorted(rows.items()):
            clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            out[rnd] = MetricRecord(clean)
        return out

    return Result(
        arrays=to_record(strategy.global_arrays or {}),
        train_metrics_clientapp=records(strategy.history["train"]),
        evaluate_metrics_clientapp=records(strategy.history["evaluate"]),
        evaluate_metrics_serverapp=records(strategy.history["server"]),
    )


def _check_model(strategy: FedImagingFedAvg, arrays: Mapping[str, np.ndarray]) -> None:
    unknown = sorted(strategy.local_param_names - set(arrays))
    if unknown:
        raise ValueError(f"site-local parameter names not in the model: {unknown[:5]}")
    for ext in strategy.extensions:
        ext.check_model(arrays)


def _check_resume_model(strategy: FedImagingFedAvg, initial_arrays: ArrayRecord) -> None:
    assert strategy.global_arrays is not None
    given = {k: (tuple(v.shape), v.dtype) for k, v in initial_arrays.items()}
    saved = {k: (tuple(v.shape), str(v.dtype)) for k, v in strategy.global_arrays.items()}
    if given != saved:
        raise ValueError("resume-from: the saved global model does not match this run's model "
                         "(different task or architecture?)")
