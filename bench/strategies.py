"""Strategies on the demo non-IID federation vs pooled and local-only training, over seeds.

    python -m bench.strategies --task segmentation --seeds 3 --out DIR [--quick]
                               [--strategies fedavg,fedprox,...] [--run-config 'k=v ...']

For every seed: pooled centralised training, local-only training per site, and each strategy
(real ServerApp logic and ClientApp on an in-process grid), all at equal total local epochs.
Writes ``DIR/strategies.json``::

    {"task": ..., "seeds": [...], "results": {"<method>": {"site_dice": {"<site>": mean},
     "mean_dice": x, "unseen_dice": x, "seconds": x}}}

The personalization arms (``ditto``, ``finetune``, ``fedbn-ditto``, ``fedbn-finetune``: FedAvg or
FedBN with run config ``personalization``) also report ``personal_site_dice`` (each site's Dice
of its personal model on its own test cases) and ``personal_mean_dice`` beside ``site_dice``
(the global model's).

plus ``DIR/strategies.md`` (table, goals) and ``DIR/learning_curves.png``. ``--quick`` uses the
small demo, 3 rounds and one seed (minutes, not hours).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.demo_study import federated_arm, local_arm, parse_overrides, pooled_arm, prepare
from fedimaging.io import atomic_path, atomic_write_json, atomic_write_text

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "scaffold", "fedbn", "fedmedian", "fedtrimmedavg")
# Personalized arms: a strategy plus run config personalization (the global model is trained as without it).
PERSONAL = {
    "ditto": {"strategy": "fedavg", "personalization": "ditto"},
    "finetune": {"strategy": "fedavg", "personalization": "finetune"},
    "fedbn-ditto": {"strategy": "fedbn", "personalization": "ditto"},
    "fedbn-finetune": {"strategy": "fedbn", "personalization": "finetune"},
}
ALL = STRATEGIES + tuple(PERSONAL)
PERSONAL_CURVE = ": personal models"  # suffix of a personalization arm's second curve
STRATEGY_OVERRIDES = {"fedprox": {"proximal-mu": 0.01}, "scaffold": {"optimizer": "sgd", "lr": 0.01}}


def arm_overrides(name: str) -> dict[str, object]:
    """Run-config overrides of arm ``name`` (a strategy, or a personalization arm)."""
    return PERSONAL.get(name) or {"strategy": name, **STRATEGY_OVERRIDES.get(name, {})}


def _mean_of(runs: list[dict]) -> dict:
    sites = runs[0]["site_dice"].keys()
    out = {
        "site_dice": {s: float(np.mean([r["site_dice"][s] for r in runs])) for s in sites},
        "mean_dice": float(np.mean([r["mean_dice"] for r in runs])),
        "unseen_dice": float(np.mean([r["unseen_dice"] for r in runs])),
        "seconds": float(np.mean([r["seconds"] for r in runs])),
        "per_seed_mean_dice": [r["mean_dice"] for r in runs],
    }
    if all("personal_site_dice" in r for r in runs):
        out["personal_site_dice"] = {s: float(np.mean([r["personal_site_dice"][s] for r in runs])) for s in sites}
        out["personal_mean_dice"] = float(np.mean([r["personal_mean_dice"] for r in runs]))
    return out


def _table(results: dict) -> str:
    sites = list(results["pooled"]["site_dice"])
    head = "| method | " + " | ".join(sites) + " | mean | unseen | seconds |"
    rows = [head, "|" + "---|" * (len(sites) + 4)]
    for method, r in results.items():
        cells = " | ".join(f"{r['site_dice'][s]:.3f}" for s in sites)
        rows.append(f"| {method} | {cells} | {r['mean_dice']:.3f} | {r['unseen_dice']:.3f} | {r['seconds']:.0f} |")
        if "personal_site_dice" in r:  # evaluated at its own site only: no unseen column
            cells = " | ".join(f"{r['personal_site_dice'][s]:.3f}" for s in sites)
            rows.append(f"| {method}: personal models | {cells} | {r['personal_mean_dice']:.3f} | n/a | |")
    return "\n".join(rows)


def _goals(results: dict) -> list[str]:
    fed = {m: r for m, r in results.items() if m not in ("pooled", "local")}
    best = max(fed, key=lambda m: fed[m]["mean_dice"])
    local = results["local"]
    ratio = fed[best]["mean_dice"] / results["pooled"]["mean_dice"]
    site_ok = all(fed[best]["site_dice"][s] >= local["site_dice"][s] for s in local["site_dice"])
    unseen_ratio = fed[best]["unseen_dice"] / max(local["unseen_dice"], 1e-9)
    personal = [
        f"{m}: every site's personal Dice >= its local-only and its global-model Dice: "
        + ("met" if all(r["personal_site_dice"][s] >= max(local["site_dice"][s], r["site_dice"][s])
                        for s in local["site_dice"]) else "not met")
        for m, r in fed.items() if "personal_site_dice" in r]
    return [
        *personal,
        f"best federated strategy: {best}",
        f"best / pooled mean Dice = {ratio:.3f} (goal >= 0.97): {'met' if ratio >= 0.97 else 'not met'}",
        f"every site's federated Dice >= its local-only Dice: {'met' if site_ok else 'not met'}",
        f"unseen: federated / mean local-only = {unseen_ratio:.2f} (goal >= 1.2): {'met' if unseen_ratio >= 1.2 else 'not met'}",
    ]


def _curve_table(curves: dict[str, list]) -> str:
    """The learning curves as a Markdown table (rows: rounds; columns: arms), for readers without the PNG."""
    names = list(curves)
    rows = ["| round | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for k in range(max(len(c) for c in curves.values())):
        cells = [f"{curves[n][k]:.3f}" if k < len(curves[n]) and np.isfinite(curves[n][k]) else "-" for n in names]
        rows.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(curves: dict[str, list], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=name,
                linestyle="--" if name.endswith(PERSONAL_CURVE) else "-")
    ax.set_xlabel("round")
    ax.set_ylabel("mean Dice (sites' test cases)")
    ax.set_title("Per round, seed-averaged: global models (solid), personal models (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="segmentation", choices=("segmentation",))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategies", default=",".join(ALL))
    parser.add_argument("--run-config", default="")
    args = parser.parse_args(argv)
    names = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {ALL}")
    out = args.out.resolve()
    base = {"task": args.task, "home": str(out / "home"), **parse_overrides(args.run_config)}
    seeds = list(range(42, 42 + (1 if args.quick else args.seeds)))
    if args.quick:
        base = {"demo-size": "small", "num-server-rounds": 3, "local-epochs": 1, **base}

    per_method: dict[str, list[dict]] = {}
    curves: dict[str, list[list[float]]] = {}
    for seed in seeds:
        study = prepare({**base, "seed": seed})
        per_method.setdefault("pooled", []).append(pooled_arm(study))
        per_method.setdefault("local", []).append(local_arm(study))
        for name in names:
            result = federated_arm(study, out / "runs" / f"{name}-seed{seed}", **arm_overrides(name))
            per_method.setdefault(name, []).append(result)
            curves.setdefault(name, []).append(result["curve"])
            if "personal_curve" in result:
                curves.setdefault(name + PERSONAL_CURVE, []).append(result["personal_curve"])
            print(json.dumps({"seed": seed, "method": name, "mean_dice": result["mean_dice"]}), file=sys.stderr, flush=True)

    results = {m: _mean_of(runs) for m, runs in per_method.items()}
    report = {"task": args.task, "seeds": seeds, "quick": args.quick, "results": results,
              "settings": {k: v for k, v in base.items() if k != "home"}}
    atomic_write_json(out / "strategies.json", report)
    goals = _goals(results)
    mean_curves = {n: list(np.nanmean(np.array(c, dtype=float), axis=0)) for n, c in curves.items()}
    atomic_write_text(out / "strategies.md", "# Strategies on the demo federation\n\n" + _table(results)
                      + "\n\n" + "\n".join(f"- {g}" for g in goals) + "\n\n## Mean Dice per round "
                      "(the sites' test cases, seed-averaged)\n\n" + _curve_table(mean_curves) + "\n")
    _plot(mean_curves, out / "learning_curves.png")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
