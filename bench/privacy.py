"""What per-site DP-SGD costs on the demo federation: Dice and training time per epsilon vs no DP.

    python -m bench.privacy --out DIR [--epsilons 1,3,8,none] [--rounds 8] [--local-epochs 2]
                            [--size standard|small] [--seed 42] [--run-config 'k=v ...'] [--quick]

Every arm is a FedAvg study through the real ServerApp logic and ClientApp on an in-process grid
(``bench.demo_study.federated_arm``), with the same rounds, local epochs, seed and data; the DP arms
set the simulation run-config key ``dp-epsilon``, so every demo site trains with Opacus DP-SGD on
its own budget (noise calibrated so the budget lasts the run). Every arm, DP or not, trains on one
crop per case per epoch (``crops-per-case=1``, which DP forces): the arms see the same samples per
epoch, so the time ratio is the cost of DP-SGD, not of extra data. Each arm gets fresh site state
(its own privacy ledgers): re-running into the same DIR replaces the arms' runs. The sites' noise
secrets are fixed from the seed (real sites draw them at random), so a rerun repeats the numbers.

``seconds_per_epoch`` is the sites' own training time (``train-seconds`` in ``metrics.jsonl``
divided by local epochs, averaged over sites and rounds): evaluation and transport are excluded.
``mean_dice`` is the final global model's case-weighted Dice over the training sites' test cases.
Goals checked: at epsilon 8 the relative Dice drop vs no DP is <= 5%; DP seconds per epoch are
<= 1.5x no DP (2x is the floor). Writes ``DIR/privacy.json`` and ``DIR/privacy.md``.

Cost, measured on an idle 2-core machine: ``--rounds 6`` took 6.7 minutes for the 4 arms (about
15 s per round with DP, 9 s without; demo generation included), so the defaults take about 9.
``--quick`` (small demo, tiny UNet, 2 rounds x 1 epoch) is a smoke run of
2-3 minutes whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.demo_study import DemoStudy, federated_arm, parse_overrides, prepare
from fedimaging.io import atomic_write_bytes, atomic_write_json, atomic_write_text

DEFAULT_ROUNDS = 8
DEFAULT_LOCAL_EPOCHS = 2
DICE_DROP_GOAL = 0.05  # relative Dice drop at epsilon 8
TIME_RATIO_GOAL = 1.5
TIME_RATIO_FLOOR = 2.0
NOISE_SECRET = Path("privacy") / "noise-secret"  # where privacy.session keeps a site's noise secret
QUICK = {"demo-size": "small", "num-server-rounds": 2, "local-epochs": 1, "spacing": "6,6,6",
         "roi-size": "16,16,16", "channels": "4,8,16", "batch-size": 2}


def parse_epsilons(text: str) -> list[float | int | None]:
    """``1,3,8,none`` -> [1, 3, 8, None]; None is the arm without DP."""
    out: list[float | int | None] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        if item in ("none", "null", "nodp", "inf"):
            value = None
        else:
            try:
                value = float(item)
            except ValueError:
                raise ValueError(f"--epsilons: {item!r} is neither a number nor 'none'") from None
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--epsilons: epsilon must be a positive number, got {item!r}")
            if value.is_integer():
                value = int(value)  # written as 8, not 8.0, in privacy.json
        if value in out:
            raise ValueError(f"--epsilons: {item!r} is listed twice")
        out.append(value)
    if not out:
        raise ValueError("--epsilons: give at least one epsilon (or 'none')")
    return out


def arm_name(epsilon: float | None) -> str:
    """Run folder (and run key: must differ between arms) of an arm."""
    return "privacy-nodp" if epsilon is None else f"privacy-eps{epsilon:g}"


def _number(value: Any) -> int | float | None:
    """JSON-safe number (NaN, e.g. a Dice with no case to score, becomes null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("phase") == "train"]


def seconds_per_epoch(records: list[dict], local_epochs: int) -> float | None:
    """Mean over sites and rounds of a site's own training seconds per local epoch (refusals skipped)."""
    values = [m["train-seconds"] / local_epochs for r in records for m in r.get("sites", {}).values()
              if "train-seconds" in m and m.get("num-examples", 0) > 0]
    return float(np.mean(values)) if values else None


def last_site_metric(records: list[dict], key: str) -> dict[str, float]:
    """Each site's latest value of a train metric (e.g. lifetime ``dp-epsilon-spent``)."""
    out: dict[str, float] = {}
    for r in records:
        for site, m in r.get("sites", {}).items():
            if key in m:
                out[site] = float(m[key])
    return dict(sorted(out.items()))


def run_arm(study: DemoStudy, out: Path, epsilon: float | None) -> dict[str, Any]:
    """One federated study at ``epsilon`` (None: no DP), with fresh site state; its summary."""
    name = arm_name(epsilon)
    run_dir, state_root = out / "runs" / name, out / "site-state" / name
    for stale in (run_dir, state_root):  # a rerun must not inherit an old run or a spent ledger
        shutil.rmtree(stale, ignore_errors=True)
    for site in study.sites:
        # A real site's noise secret is random (the server must not guess the noise); a benchmark
        # fixes it from the seed so that a rerun gives the same numbers.
        secret = hashlib.sha256(f"bench.privacy:{study.run.seed}:{site}".encode()).digest()
        atomic_write_bytes(state_root / site / NOISE_SECRET, secret, mode=0o600)
    # Each arm is one study on fresh site state, so it may spend the sites' whole budget.
    keys = {"dp-epsilon": epsilon or 0.0, "dp-study-epsilon": epsilon or 0.0, "state-root": str(state_root)}
    fed = federated_arm(study, run_dir, strategy="fedavg", **keys)
    records = train_records(run_dir)
    excluded = {site: reason for r in records for site, reason in (r.get("excluded") or {}).items()}
    return {
        "epsilon": epsilon,
        "mean_dice": _number(fed["mean_dice"]),
        "seconds_per_epoch": _number(seconds_per_epoch(records, study.run.local_epochs)),
        "epsilon_spent": last_site_metric(records, "dp-epsilon-spent"),
        "site_dice": {s: _number(v) for s, v in fed["site_dice"].items()},
        "unseen_dice": _number(fed["unseen_dice"]),
        "noise_multiplier": last_site_metric(records, "dp-noise-multiplier"),
        "sample_rate": last_site_metric(records, "dp-sample-rate"),
        "curve": [_number(v) for v in fed["curve"]],
        "seconds": fed["seconds"],
        "seconds_per_round": fed["seconds_per_round"],
        "excluded": excluded,
        "run_dir": fed["run_dir"],
    }


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add each DP arm's Dice drop and time ratio vs the no-DP arm; return the goal checks."""
    base = next((r for r in results if r["epsilon"] is None), None)
    for r in results:
        drop = ratio = None
        if base is not None and r["epsilon"] is not None:
            if base["mean_dice"] and r["mean_dice"] is not None:
                drop = (base["mean_dice"] - r["mean_dice"]) / base["mean_dice"]
            if base["seconds_per_epoch"] and r["seconds_per_epoch"] is not None:
                ratio = r["seconds_per_epoch"] / base["seconds_per_epoch"]
        r["dice_drop_vs_nodp"], r["time_ratio_vs_nodp"] = drop, ratio
    at8 = next((r["dice_drop_vs_nodp"] for r in results if r["epsilon"] == 8), None)
    ratios = {f"{r['epsilon']:g}": r["time_ratio_vs_nodp"] for r in results if r["time_ratio_vs_nodp"] is not None}
    worst = max(ratios.values()) if ratios else None
    return {
        "dice_drop_at_epsilon_8": {"value": at8, "goal": f"<= {DICE_DROP_GOAL:g}",
                                   "met": None if at8 is None else at8 <= DICE_DROP_GOAL},
        "dp_time_ratio": {"value": worst, "per_epsilon": ratios, "goal": f"<= {TIME_RATIO_GOAL:g}",
                          "floor": f"<= {TIME_RATIO_FLOOR:g}",
                          "met": None if worst is None else worst <= TIME_RATIO_GOAL,
                          "floor_met": None if worst is None else worst <= TIME_RATIO_FLOOR},
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(goal: dict[str, Any]) -> str:
    if goal["met"] is None:
        return "not measured (needs the no-DP arm" + (" and epsilon 8)" if "floor" not in goal else " and a DP arm)")
    if goal["met"]:
        return "met"
    return "not met" + ("" if "floor" not in goal else (" (floor met)" if goal["floor_met"] else " (floor missed)"))


def markdown(report: dict[str, Any]) -> str:
    """The table of DIR/privacy.md: one row per arm, then the goal checks."""
    results, goals, s = report["results"], report["goals"], report["settings"]
    sites = sorted({site for r in results for site in r["site_dice"]})
    head = ("| epsilon | " + " | ".join(sites) + " | mean Dice | unseen | drop vs no DP | s/epoch | x no DP "
            "| epsilon spent (max) | noise multiplier |")
    rows = [head, "|" + "---|" * (len(sites) + 8)]
    for r in results:
        spent = max(r["epsilon_spent"].values()) if r["epsilon_spent"] else None
        noise = ", ".join(f"{v:.2f}" for v in r["noise_multiplier"].values()) or "-"
        cells = " | ".join(_fmt(r["site_dice"].get(site), ".3f") for site in sites)
        drop = None if r["dice_drop_vs_nodp"] is None else 100 * r["dice_drop_vs_nodp"]
        rows.append(f"| {'none' if r['epsilon'] is None else format(r['epsilon'], 'g')} | {cells} "
                    f"| {_fmt(r['mean_dice'], '.3f')} | {_fmt(r['unseen_dice'], '.3f')} | {_fmt(drop, '+.1f')}"
                    f"{'' if drop is None else '%'} | {_fmt(r['seconds_per_epoch'], '.2f')} "
                    f"| {_fmt(r['time_ratio_vs_nodp'], '.2f')} | {_fmt(spent, '.2f')} | {noise} |")
    drop8, ratio = goals["dice_drop_at_epsilon_8"], goals["dp_time_ratio"]
    lines = [
        "# DP-SGD on the demo federation (FedAvg)",
        "",
        (f"{s['rounds']} rounds x {s['local_epochs']} local epochs, demo {s['demo_size']}, seed {s['seed']}, "
         f"dp-delta {s['dp_delta'] or 'default min(1e-5, 1/(10 N))'}, dp-max-grad-norm {s['dp_max_grad_norm']:g}, "
         f"{s['torch_threads']} torch threads{', QUICK (smoke only)' if s['quick'] else ''}."),
        "",
        *rows,
        "",
        (f"- Dice drop at epsilon 8 vs no DP: {_fmt(None if drop8['value'] is None else 100 * drop8['value'], '.1f')}% "
         f"(goal <= {100 * DICE_DROP_GOAL:g}%): {_verdict(drop8)}"),
        (f"- DP training seconds per epoch vs no DP, worst arm: {_fmt(ratio['value'], '.2f')}x "
         f"(goal <= {TIME_RATIO_GOAL:g}x, floor {TIME_RATIO_FLOOR:g}x): {_verdict(ratio)}"),
        "",
        ("s/epoch: the sites' own training seconds per local epoch (metrics.jsonl `train-seconds`), "
         "mean over sites and rounds; noise multiplier: per site, in site order."),
    ]
    return "\n".join(lines) + "\n"


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config shared by every arm (the arms add ``dp-epsilon``, ``state-root``, ``run-dir``)."""
    raw: dict[str, Any] = {"strategy": "fedavg", "seed": args.seed, "demo-size": args.size,
                           "num-server-rounds": DEFAULT_ROUNDS, "local-epochs": DEFAULT_LOCAL_EPOCHS,
                           "crops-per-case": 1}
    if args.quick:
        raw.update(QUICK)
    raw["home"] = str(args.out / "home")
    overrides = parse_overrides(args.run_config)
    for key in ("dp-epsilon", "dp-study-epsilon", "state-root", "run-dir", "resume-from", "strategy"):
        if key in overrides:
            raise ValueError(f"--run-config may not set {key!r}: the benchmark sets it for every arm")
    raw.update(overrides)
    if args.rounds is not None:
        raw["num-server-rounds"] = args.rounds
    if args.local_epochs is not None:
        raw["local-epochs"] = args.local_epochs
    if args.size_given:
        raw["demo-size"] = args.size
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="1,3,8,none", help="comma-separated; 'none' = the arm without DP")
    parser.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS} (2 with --quick)")
    parser.add_argument("--local-epochs", type=int, default=None,
                        help=f"default {DEFAULT_LOCAL_EPOCHS} (1 with --quick)")
    parser.add_argument("--size", choices=("standard", "small"), default=None, help="demo size (default standard)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--run-config", default="", help="extra run-config overrides, as for flwr run")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (small demo, tiny UNet, 2 rounds)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.size_given = args.size is not None
    args.size = args.size or "standard"
    try:
        epsilons = parse_epsilons(args.epsilons)
        raw = build_config(args)
    except ValueError as exc:
        parser.error(str(exc))

    study = prepare(raw)
    if study.run.task != "segmentation":
        parser.error("bench.privacy measures segmentation (task=segmentation)")
    torch.set_num_threads(study.run.torch_threads or torch.get_num_threads())
    results = []
    for epsilon in epsilons:
        results.append(run_arm(study, args.out, epsilon))
        r = results[-1]
        print(json.dumps({"epsilon": epsilon, "mean_dice": r["mean_dice"], "seconds_per_epoch": r["seconds_per_epoch"],
                          "epsilon_spent": r["epsilon_spent"]}), file=sys.stderr, flush=True)
    goals = compare(results)
    run = study.run
    report = {
        "benchmark": "privacy",
        "settings": {
            "rounds": run.num_server_rounds, "local_epochs": run.local_epochs, "demo_size": run.demo_size,
            "seed": run.seed, "strategy": run.strategy, "sites": study.sites, "test_cases": study.test_cases,
            "dp_delta": run.dp_delta or None, "dp_max_grad_norm": run.dp_max_grad_norm,
            "crops_per_case": run.crops_per_case, "batch_size": run.batch_size, "lr": run.lr,
            "torch_threads": torch.get_num_threads(), "quick": args.quick,
            "run_config": {k: v for k, v in raw.items() if k != "home"},
        },
        "results": results,
        "goals": goals,
    }
    atomic_write_json(args.out / "privacy.json", report)
    table = markdown(report)
    atomic_write_text(args.out / "privacy.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
