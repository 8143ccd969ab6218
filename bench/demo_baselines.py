"""Pooled (centralised) vs local-only vs FedAvg on the demo federation, at equal epochs.

    python -m bench.demo_baselines [--rounds 12] [--local-epochs 2] [--seed 42] [--size standard]
                                   [--out DIR] [--run-config 'key=value ...']

* ``pooled``: one model trained on all sites' training cases for rounds x local-epochs epochs;
* ``local``: each site trains its own model on its own cases for the same number of epochs;
* ``fedavg``: the real ServerApp study (our FedAvg strategy, the real ClientApp) for ``rounds``
  rounds of ``local-epochs``, through an in-process grid (``bench.local_grid``): no SuperLink or
  Ray, so ``seconds_per_round`` is the method's cost without Flower's transport (about 2 s per
  phase more in a Flower simulation).

Every model is evaluated on every site's test cases and on the unseen site. ``mean_dice`` is
the case-weighted mean over the training sites' test cases (as in ``metrics.jsonl``). Prints
one JSON object; also writes it to ``OUT/demo_baselines.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.client_app import app as client_app
from app.config import parse_run_config
from app.server_app import run_study
from bench.local_grid import LocalGrid
from data_prep.demo import UNSEEN_SITE, demo_site_names, ensure_demo_site
from data_prep.site_dataset import load_site_dataset
from tasks import LocalTrainingOptions, get_task
from strategies.cross_site import UNSEEN as CROSS_SITE_UNSEEN
from tasks.segmentation import pooled_site_data


def _overrides(text: str) -> dict[str, str]:
    out = {}
    for item in shlex.split(text or ""):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def _weighted(site_dice: dict[str, float], weights: dict[str, int]) -> float:
    return float(np.average([site_dice[s] for s in weights], weights=list(weights.values())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--size", choices=("standard", "small"), default="standard")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--run-config", default="", help="extra run-config overrides, as for flwr run")
    args = parser.parse_args(argv)

    out = (args.out or Path(tempfile.mkdtemp(prefix="demo-baselines-"))).resolve()
    raw = {"seed": args.seed, "demo-size": args.size, "home": str(out / "home"), "run-dir": str(out / "fedavg"),
           **_overrides(args.run_config)}
    if args.rounds is not None:
        raw["num-server-rounds"] = args.rounds
    if args.local_epochs is not None:
        raw["local-epochs"] = args.local_epochs
    run = parse_run_config(raw)
    torch.set_num_threads(run.torch_threads or torch.get_num_threads())
    epochs = run.num_server_rounds * run.local_epochs
    sites = demo_site_names(run.demo_sites)
    task = get_task(run.task, run.task_settings())
    if run.task != "segmentation":
        raise SystemExit("bench.demo_baselines compares segmentation models (task=segmentation)")

    data = {}
    for site in sites + [UNSEEN_SITE]:
        path = ensure_demo_site(run.demo_root_path, site, run.seed, run.task, run.demo_size)
        data[site] = task.prepare_site(load_site_dataset(path, require_training=site != UNSEEN_SITE))
    test_cases = {s: len(data[s].test) for s in sites}

    def evaluate_everywhere(model) -> dict[str, float]:
        return {s: task.evaluate(model, data[s])["dice"] for s in sites + [UNSEEN_SITE]}

    results = {}
    t0 = time.perf_counter()
    pooled = task.build_model()
    task.train(pooled, pooled_site_data([data[s] for s in sites]), LocalTrainingOptions(epochs=epochs, seed=run.seed))
    scores = evaluate_everywhere(pooled)
    results["pooled"] = {
        "site_dice": {s: scores[s] for s in sites}, "mean_dice": _weighted(scores, test_cases),
        "unseen_dice": scores[UNSEEN_SITE], "seconds": time.perf_counter() - t0,
    }
    print(json.dumps({"pooled": results["pooled"]}), file=sys.stderr, flush=True)

    local_matrix = {}
    t0 = time.perf_counter()
    for index, site in enumerate(sites):
        model = task.build_model()
        task.train(model, data[site], LocalTrainingOptions(epochs=epochs, seed=run.seed + index + 1))
        local_matrix[site] = evaluate_everywhere(model)
    own = {s: local_matrix[s][s] for s in sites}
    results["local"] = {
        "site_dice": own, "mean_dice": _weighted(own, test_cases),
        "unseen_dice": float(np.mean([local_matrix[s][UNSEEN_SITE] for s in sites])),
        "matrix": local_matrix, "seconds": time.perf_counter() - t0,
    }
    print(json.dumps({"local": results["local"]["site_dice"]}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))],
                     {**raw, "cross-site": "true"})
    run_dir = run_study(grid, {**raw, "cross-site": True}, run_id=1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if r["phase"] == "evaluate" and r.get("sites")][-1]
    fed_site = {s: last_eval["sites"][s]["dice"] for s in sites}
    cross = json.loads((run_dir / "cross_site.json").read_text())
    unseen = cross["matrix"][cross["models"].index("global")][cross["sites"].index(CROSS_SITE_UNSEEN)]
    per_round = {}
    for r in records:
        per_round[r["round"]] = per_round.get(r["round"], 0.0) + r["seconds"]
    results["fedavg"] = {
        "site_dice": fed_site, "mean_dice": _weighted(fed_site, test_cases), "unseen_dice": unseen,
        "seconds": time.perf_counter() - t0, "seconds_per_round": float(np.mean(list(per_round.values()))),
        "run_dir": str(run_dir),
    }
    report = {
        "benchmark": "demo_baselines",
        "config": {"rounds": run.num_server_rounds, "local_epochs": run.local_epochs, "epochs_total": epochs,
                   "seed": run.seed, "demo_size": run.demo_size, "sites": sites, "test_cases": test_cases,
                   "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_baselines.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
