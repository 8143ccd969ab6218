"""ServerApp: parse the run config, build the initial model and strategy, run, report.

Flower imports this from its installed app bundle and runs it in the local SuperLink's
working folder, so every path is made absolute (``RunConfig.run_dir_path``) and logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from app.config import RunConfig, parse_run_config, strategy_settings
from app.config_values import ConfigError
from app.preflight import check_site_channels
from app.tensorboard_log import TensorBoardLog
from strategies import NoSiteTrained, RunDirectory, build_strategy
from tasks import get_task

log = logging.getLogger("fedimaging.server")
app = ServerApp()

NODE_WAIT_SECONDS = 60.0


def _wait_for_sites(grid: Grid, run: RunConfig, needed: int) -> None:
    """Fail fast with advice when a simulation has fewer SuperNodes than demo sites."""
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(list(grid.get_node_ids())) < needed:
        if run.uses_demo and time.monotonic() > deadline:
            have = len(list(grid.get_node_ids()))
            raise RuntimeError(
                f"the demo federation needs {needed} sites but only {have} SuperNode(s) joined; run "
                f"'flwr run . --stream --federation-config \"num-supernodes={run.demo_sites}\"' "
                f"or set --run-config 'demo-sites={have}'"
            )
        time.sleep(1.0)


def _run_name(run: RunConfig, run_id: int) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{run.task}-{run.strategy}-{run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated study described by the run config."""
    from app.polling_grid import faster_polling  # Flower's HttpGrid waits 3 s between pulls

    run_study(faster_polling(grid), context.run_config, int(context.run_id))


def run_study(grid: Grid, run_config: dict, run_id: int) -> Path:
    """The whole study on ``grid`` (Flower's, or the benchmarks' in-process one); returns the run dir."""
    run = parse_run_config(run_config)
    if run.resume_from and not run.run_dir:
        run_dir = Path(run.resume_from).expanduser().resolve()
    else:
        run_dir = run.run_dir_path(_run_name(run, run_id))
    print(f"Run directory: {run_dir}", flush=True)
    torch.set_num_threads(max(1, run.torch_threads or torch.get_num_threads()))

    task = get_task(run.task, run.task_settings())
    model = _build_model(task)
    if run.init_from:  # transfer learning; a resumed run continues from its saved model instead
        from app.init_from import init_from

        loaded, skipped = init_from(model, run.init_from)
        print(f"init-from: loaded {len(loaded)} tensors, skipped {len(skipped)} (details in the log)", flush=True)
    local_names = task.local_param_names(model)
    frozen = _frozen_names(task, model)
    directory = RunDirectory(run_dir)
    directory.write_run_config(
        {
            **run.to_json(),
            "_environment": {
                "flwr": flwr.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "python-prefix": sys.prefix,
                "run-id": run_id,
            },
        }
    )
    min_sites = run.demo_sites if run.uses_demo else run.min_available_sites
    _wait_for_sites(grid, run, min_sites)
    check_site_channels(grid, run.in_channels, run_dir, run.round_timeout_s)  # stops before round 1
    settings = strategy_settings(run, task.best_metric, min_sites)
    strategy = build_strategy(settings, directory, local_names, frozen)
    printer = _console_printer(settings.best_metric, run.personalization != "none")
    board = TensorBoardLog(run_dir) if run.tensorboard else None

    def on_round_end(server_round: int, records: list[dict]) -> None:
        printer(server_round, records)
        if board is not None:
            board.log_round(server_round, records)

    strategy.on_round_end = on_round_end
    # The sites key their state by the run; the strategy adds each round's epochs and lr.
    common = {"run-key": run_dir.name}
    try:
        strategy.run(
            grid,
            ArrayRecord(model.state_dict()),
            train_config=ConfigRecord({**common, "evaluate-received": run.evaluate_received}),
            evaluate_config=ConfigRecord(common),
        )
    except NoSiteTrained as exc:
        _write_report(run_dir)
        print(f"Run failed: {exc}", flush=True)
        print(f"Run directory: {run_dir}", flush=True)
        raise
    finally:
        if board is not None:
            board.close()
    _print_final(directory, settings.best_metric)
    _write_report(run_dir)
    print(f"Run directory: {run_dir}", flush=True)
    return run_dir


def _build_model(task):
    """The initial model; run config ``freeze`` is resolved here, before round 1 (a bad pattern stops)."""
    from tasks.freeze import FreezeError

    try:
        return task.build_model()
    except FreezeError as exc:
        raise ConfigError(str(exc)) from None


def _frozen_names(task, model) -> frozenset[str]:
    """Run config ``freeze`` resolved against the model (sent to the sites, never returned)."""
    frozen = task.frozen_names(model)
    if frozen:
        trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
        total = sum(p.numel() for p in model.parameters())
        print(f"freeze: {len(frozen)} tensors fixed; {trainable} of {total} parameters train and travel back",
              flush=True)
    return frozen


def _write_report(run_dir: Path) -> None:
    from app.report import write_report

    print(f"Report: {write_report(run_dir)}", flush=True)


def _console_printer(metric: str, personal: bool = False):
    """One line per round: round, sites, loss, metric, epsilon, seconds (DESIGN 3.5 numbers)."""
    try:
        from app.console import format_header, format_round_row
    except ImportError:
        format_header = format_round_row = None
    state = {"header": False}

    def on_round_end(server_round: int, records: list[dict]) -> None:
        if format_round_row is None:
            print(f"[round {server_round}] " + json.dumps(records[-1].get("aggregate", {})), flush=True)
            return
        if not state["header"]:
            print(format_header(metric, personal), flush=True)
            state["header"] = True
        print(format_round_row(server_round, records, metric, personal), flush=True)

    return on_round_end


def _print_final(directory: RunDirectory, metric: str) -> None:
    evaluations = [r for r in directory.read_metrics() if r.get("phase") == "evaluate" and r.get("aggregate")]
    if not evaluations:
        print("No evaluation results were reported.", flush=True)
        return
    last = evaluations[-1]
    value = last["aggregate"].get(metric)
    sites = ", ".join(f"{s}={m.get(metric, float('nan')):.3f}" for s, m in sorted(last.get("sites", {}).items())
                      if isinstance(m.get(metric), (int, float)))
    # None when no site's test cases define the metric (e.g. AUC where each site has one class)
    shown = f"{value:.3f}" if isinstance(value, (int, float)) else "undefined"
    print(f"Final global model (round {last['round']}): mean {metric} over the sites' test cases = "
          f"{shown} ({sites})", flush=True)
