"""Synthetic run directories and tiny models for the hand-off tests (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from app.config import parse_run_config
from strategies.run_dir import RunDirectory
from tasks import get_task

SITES = ("site-a", "site-b", "site-c")
# tiny model and coarse spacing: prediction takes about a second on a CPU
TINY = {"spacing": "5,5,5", "roi-size": "32,32,32", "channels": "4,8,16", "num-res-units": 1}


def write_run_config(run_dir: Path, **overrides) -> dict:
    config = parse_run_config({"task": "segmentation", "strategy": "fedavg", "seed": 7, **TINY, **overrides})
    doc = {**config.to_json(), "_environment": {"torch": torch.__version__}}
    RunDirectory(run_dir).write_run_config(doc)
    return doc


def save_random_model(run_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised model of the run's task saved as final_model.pt (weights only)."""
    doc = json.loads((run_dir / "run_config.json").read_text())
    values = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in doc.items() if not k.startswith("_")}
    config = parse_run_config({**values, "seed": seed, **overrides})
    task = get_task(config.task, config.task_settings())
    model = task.build_model()
    if config.task == "segmentation":
        torch.manual_seed(seed)
        with torch.no_grad():  # perturb so that the mask is not trivially all one class
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    path = run_dir / "final_model.pt"
    torch.save(model.state_dict(), path)
    return path


def synthetic_metrics(rounds: int = 5, dp: bool = True, seed: int = 0) -> list[dict]:
    """metrics.jsonl records shaped like strategies.base writes them, with one exclusion and DP."""
    rng = np.random.default_rng(seed)
    cases = {"site-a": (32, 8), "site-b": (16, 4), "site-c": (5, 3)}
    records = []
    for rnd in range(1, rounds + 1):
        sites, excluded = {}, {}
        for i, site in enumerate(SITES):
            if rnd == 3 and site == "site-c":
                excluded[site] = "rejected: update norm 41.2 > bound 10.0"
                continue
            m = {"num-examples": cases[site][0], "loss": float(1.2 / rnd + 0.05 * i + rng.normal(0, 0.02)),
                 "train-steps": 20, "train-seconds": 4.0 + i, "update-norm": float(5.0 / rnd + i)}
            if dp:
                m["dp-epsilon-spent"] = float(1.1 * rnd * (1 + 0.3 * i))
            sites[site] = m
        n = sum(s["num-examples"] for s in sites.values())
        agg = {"loss": sum(s["loss"] * s["num-examples"] for s in sites.values()) / n}
        records.append({"round": rnd, "phase": "train", "seconds": 10.0 + rnd, "sites": sites,
                        "aggregate": agg, "excluded": excluded})
        esites = {}
        for i, site in enumerate(SITES):
            dice = float(min(0.95, 0.3 + 0.12 * rnd - 0.05 * i + rng.normal(0, 0.01)))
            esites[site] = {"num-examples": cases[site][1], "loss": 1.0 - dice, "dice": dice,
                            "hd95": float(30.0 / rnd + i), "dice-class1": dice + 0.05, "dice-class2": dice - 0.05}
        n = sum(s["num-examples"] for s in esites.values())
        eagg = {k: sum(s[k] * s["num-examples"] for s in esites.values()) / n
                for k in ("loss", "dice", "hd95", "dice-class1", "dice-class2")}
        records.append({"round": rnd, "phase": "evaluate", "seconds": 3.0, "sites": esites,
                        "aggregate": eagg, "excluded": {}})
    return records


def synthetic_cross_site(rounds: int = 5) -> dict:
    models = ["global", "local:site-a", "local:site-b", "local:site-c"]
    sites = [*SITES, "unseen"]
    matrix = [[0.81, 0.78, 0.70, 0.74], [0.80, 0.52, 0.31, 0.49], [0.55, 0.71, 0.28, 0.47], [None, 0.22, 0.66, 0.18]]
    return {"metric": "dice", "round": rounds, "models": models, "sites": sites, "matrix": matrix,
            "summary": {"mean_diagonal": 0.63, "mean_off_diagonal": 0.39, "global_mean": 0.763},
            "excluded": {"local:site-a@site-c": "error reply (code 1): out of memory"}}


def make_run_dir(run_dir: Path, rounds: int = 5, dp: bool = True, cross: bool = True, final: bool = True) -> Path:
    d = RunDirectory(run_dir)
    write_run_config(run_dir, **{"num-server-rounds": rounds})
    for record in synthetic_metrics(rounds, dp):
        d.append_metrics(record)
    if cross:
        d.write_cross_site(synthetic_cross_site(rounds))
    if final:
        save_random_model(run_dir)
    return run_dir
