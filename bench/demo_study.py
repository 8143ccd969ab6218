"""Shared pieces of the demo benchmarks: data, pooled and local-only baselines, federated runs.

All arms see the same demo federation and the same number of epochs per site (rounds x
local epochs). Federated runs go through the real ServerApp logic (``run_study``) and the real
ClientApp on an in-process grid (``bench.local_grid``), so what is measured is the method, not
Flower's transport.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.client_app import app as client_app
from app.config import RunConfig, parse_run_config
from app.server_app import run_study
from bench.local_grid import LocalGrid
from data_prep.demo import UNSEEN_SITE, demo_site_names, ensure_demo_site
from data_prep.site_dataset import load_site_dataset
from strategies.settings import scheduled_lr
from strategies.cross_site import UNSEEN as CROSS_SITE_UNSEEN
from tasks import LocalTrainingOptions, Task, get_task
from tasks.data import pooled_site_data


def parse_overrides(text: str) -> dict[str, str]:
    """``key=value other="x y"`` as ``flwr run --run-config`` takes it."""
    out = {}
    for item in shlex.split(text or ""):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def train_centralised(task: Task, model: Any, data: Any, run: RunConfig, seed: int) -> None:
    """Train ``model`` on ``data`` as one site of the study would: ``num-server-rounds`` rounds of
    ``local-epochs`` epochs, each round at the study's scheduled learning rate with a fresh optimizer.

    So a pooled or local-only arm differs from the federated arms only in whose cases it sees, not
    in its schedule (a constant rate for all epochs gave the centralised arms a worse recipe)."""
    for server_round in range(1, run.num_server_rounds + 1):
        lr = scheduled_lr(run.lr, run.lr_schedule, run.num_server_rounds, server_round)
        task.train(model, data, LocalTrainingOptions(epochs=run.local_epochs, lr=lr, seed=seed * 1000 + server_round))


@dataclass
class DemoStudy:
    """The demo federation prepared once: task, site data, case counts."""

    raw: dict[str, Any]
    run: RunConfig
    task: Task
    sites: list[str]
    data: dict[str, Any]

    @property
    def epochs(self) -> int:
        return self.run.num_server_rounds * self.run.local_epochs

    @property
    def test_cases(self) -> dict[str, int]:
        return {s: len(self.data[s].test) for s in self.sites}

    def weighted(self, site_scores: dict[str, float]) -> float:
        """Case-weighted mean over the training sites' test cases (as metrics.jsonl aggregates)."""
        weights = self.test_cases
        return float(np.average([site_scores[s] for s in weights], weights=list(weights.values())))

    def evaluate_everywhere(self, model) -> dict[str, float]:
        metric = self.task.best_metric
        return {s: self.task.evaluate(model, self.data[s])[metric] for s in self.sites + [UNSEEN_SITE]}


def prepare(raw: dict[str, Any]) -> DemoStudy:
    run = parse_run_config(raw)
    task = get_task(run.task, run.task_settings())
    sites = demo_site_names(run.demo_sites)
    data = {}
    for site in sites + [UNSEEN_SITE]:
        path = ensure_demo_site(run.demo_root_path, site, run.seed, run.task, run.demo_size)
        data[site] = task.prepare_site(load_site_dataset(path, require_training=site != UNSEEN_SITE))
    return DemoStudy(raw, run, task, sites, data)


def pooled_arm(study: DemoStudy) -> dict[str, Any]:
    """One model on all sites' training cases (the centralised upper reference)."""
    t0 = time.perf_counter()
    model = study.task.build_model()
    train_centralised(study.task, model, pooled_site_data([study.data[s] for s in study.sites]), study.run,
                      study.run.seed)
    scores = study.evaluate_everywhere(model)
    return {"site_dice": {s: scores[s] for s in study.sites}, "mean_dice": study.weighted(scores),
            "unseen_dice": scores[UNSEEN_SITE], "seconds": time.perf_counter() - t0}


def local_arm(study: DemoStudy) -> dict[str, Any]:
    """Each site alone, same epochs; every local model evaluated at every site."""
    t0 = time.perf_counter()
    matrix = {}
    for index, site in enumerate(study.sites):
        model = study.task.build_model()
        train_centralised(study.task, model, study.data[site], study.run, study.run.seed + index + 1)
        matrix[site] = study.evaluate_everywhere(model)
    own = {s: matrix[s][s] for s in study.sites}
    return {"site_dice": own, "mean_dice": study.weighted(own),
            "unseen_dice": float(np.mean([matrix[s][UNSEEN_SITE] for s in study.sites])),
            "matrix": matrix, "seconds": time.perf_counter() - t0}


def run_federated(raw: dict[str, Any], n_sites: int, run_dir: Path, metric: str) -> dict[str, Any]:
    """A study through ``run_study`` on an in-process grid of ``n_sites`` (partition ids), read back
    from its ``metrics.jsonl``: final per-site ``metric``, per-round curve, seconds."""
    raw = {**raw, "run-dir": str(run_dir)}
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": n_sites} for i in range(n_sites)], raw)
    t0 = time.perf_counter()
    run_dir = run_study(grid, raw, run_id=1)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r["phase"] == "evaluate" and r.get("sites")]
    last = evaluations[-1]["sites"]
    per_round: dict[int, float] = {}
    for r in records:
        per_round[r["round"]] = per_round.get(r["round"], 0.0) + r["seconds"]
    result = {"site_dice": {s: last[s][metric] for s in last}, "seconds": seconds,
              "seconds_per_round": float(np.mean(list(per_round.values()))),
              "curve": [r["aggregate"].get(metric) for r in evaluations], "run_dir": str(run_dir),
              "test_cases": {s: last[s].get("num-examples") for s in last}}
    personal = {s: last[s].get(f"personal-{metric}") for s in last}
    if all(isinstance(v, (int, float)) for v in personal.values()):  # personalization: each site's own model
        result["personal_site_dice"] = personal
        result["personal_curve"] = [r["aggregate"].get(f"personal-{metric}") for r in evaluations]
    return result


def federated_arm(study: DemoStudy, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A federated study with the real ServerApp/ClientApp code; per-round curve included."""
    raw = {**study.raw, "cross-site": True, **overrides}
    result = run_federated(raw, len(study.sites), run_dir, study.task.best_metric)
    result.pop("test_cases")
    result["site_dice"] = {s: result["site_dice"][s] for s in study.sites}
    cross = json.loads((Path(result["run_dir"]) / "cross_site.json").read_text())
    result["mean_dice"] = study.weighted(result["site_dice"])
    result["unseen_dice"] = cross["matrix"][cross["models"].index("global")][cross["sites"].index(CROSS_SITE_UNSEEN)]
    if "personal_site_dice" in result:
        result["personal_site_dice"] = {s: result["personal_site_dice"][s] for s in study.sites}
        result["personal_mean_dice"] = study.weighted(result["personal_site_dice"])
    return result
