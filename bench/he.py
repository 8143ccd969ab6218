"""What encrypted aggregation costs: the same FedAvg study with ``secure-aggregation=off`` and ``he``.

    python -m bench.he --out DIR [--rounds 5] [--local-epochs 2] [--size standard|small] [--seed 42]
                       [--run-config 'k=v ...'] [--quick]

Both arms run the real ServerApp logic and ClientApp on an in-process grid (``bench.local_grid``)
with the same seed, data and settings; each arm runs in its own Python process so that
``peak_rss_mb`` (the process's peak resident memory: coordinator *and* all simulated sites, which
share the process) belongs to that arm alone. Writes ``DIR/he.json`` and keeps the coordinator's
run directories as ``DIR/runs/off/`` and ``DIR/runs/he/`` (``final_model.pt`` included).

Per arm: ``mean_dice`` (the final global model's case-weighted Dice on the training sites' test
cases), ``seconds_per_round`` (wall time of the study divided by its rounds; cross-site evaluation
and report included), ``bytes_up_per_site_round``/``bytes_down_per_site_round`` (the serialized
size, Flower's protobuf, of the model exchange: train instructions and replies, plus under ``he``
the public-context and decryption queries and answers; evaluation messages are the same in both
arms and left out), ``peak_rss_mb``. ``largest_difference``: the largest absolute difference
between the two final models' parameters. ``--quick``: small demo, tiny UNet, 2 rounds x 1 epoch
(a smoke run: its numbers say nothing about the real model).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedimaging.io import atomic_write_json

QUICK = {"demo-size": "small", "num-server-rounds": 2, "local-epochs": 1, "spacing": "6,6,6",
         "roi-size": "16,16,16", "channels": "4,8,16", "batch-size": 2}
EXCHANGE = ("train", "query.he_public", "query.he_decrypt")


def _metered_grid(client_app, node_configs, raw):
    from flwr.common.serde import recorddict_to_proto

    from bench.local_grid import LocalGrid

    class MeteredGrid(LocalGrid):
        """LocalGrid that adds up the wire size of the model exchange per node."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.down: dict[int, int] = defaultdict(int)
            self.up: dict[int, int] = defaultdict(int)

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = list(super().send_and_receive(messages, timeout=timeout))
            for msg in messages:
                if msg.metadata.message_type in EXCHANGE:
                    self.down[msg.metadata.dst_node_id] += recorddict_to_proto(msg.content).ByteSize()
            for reply in replies:
                if reply.metadata.message_type in EXCHANGE and reply.has_content():
                    self.up[reply.metadata.src_node_id] += recorddict_to_proto(reply.content).ByteSize()
            return replies

    return MeteredGrid(client_app, node_configs, raw)


def run_arm(raw: dict[str, Any], out: Path, mode: str) -> dict[str, Any]:
    """One study (in this process); its figures."""
    from app.client_app import app as client_app
    from app.server_app import run_study
    from bench.demo_study import prepare

    study = prepare(raw)
    run_dir, state_root = out / "runs" / mode, out / "site-state" / mode
    for stale in (run_dir, state_root):
        shutil.rmtree(stale, ignore_errors=True)
    arm = {**raw, "run-dir": str(run_dir), "state-root": str(state_root), "secure-aggregation": mode,
           "strategy": "fedavg", "cross-site": True}
    grid = _metered_grid(client_app, [{"partition-id": i, "num-partitions": len(study.sites)}
                                      for i in range(len(study.sites))], arm)
    t0 = time.perf_counter()
    run_study(grid, arm, run_id=1)
    seconds = time.perf_counter() - t0
    rounds = study.run.num_server_rounds
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["phase"] == "evaluate" and r.get("sites")][-1]
    site_dice = {s: final["sites"][s][study.task.best_metric] for s in study.sites}
    per_site = len(study.sites) * rounds
    return {
        "mean_dice": study.weighted(site_dice),
        "site_dice": site_dice,
        "seconds_per_round": seconds / rounds,
        "bytes_up_per_site_round": sum(grid.up.values()) / per_site,
        "bytes_down_per_site_round": sum(grid.down.values()) / per_site,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "excluded": {s: why for r in records if r["phase"] == "train" for s, why in r.get("excluded", {}).items()},
        "run_dir": str(run_dir),
    }


def largest_difference(a: Path, b: Path) -> float:
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if set(x) != set(y):
        raise ValueError(f"{a} and {b} hold different parameters")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point())


def build_raw(args: argparse.Namespace) -> dict[str, Any]:
    from bench.demo_study import parse_overrides

    raw: dict[str, Any] = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
                           "demo-size": args.size, "seed": args.seed}
    if args.quick:
        raw.update(QUICK)
    if args.home:
        raw["home"] = args.home
    raw.update(parse_overrides(args.run_config))
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.he", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--size", choices=("standard", "small"), default="standard")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--home", default="", help="fedimaging home (demo cache); default ~/.fedimaging")
    parser.add_argument("--run-config", default="", help="extra run config, e.g. 'torch-threads=1'")
    parser.add_argument("--quick", action="store_true", help="smoke run: small demo, tiny UNet, 2 rounds")
    parser.add_argument("--arm", choices=("off", "he"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    out = args.out.expanduser().resolve()
    raw = build_raw(args)
    if args.arm:
        atomic_write_json(out / f"arm-{args.arm}.json", run_arm(raw, out, args.arm))
        return 0
    results = {}
    for mode in ("off", "he"):
        child = [sys.executable, "-m", "bench.he", *(argv if argv is not None else sys.argv[1:]), "--arm", mode]
        subprocess.run(child, check=True)
        results[mode] = json.loads((out / f"arm-{mode}.json").read_text())
        (out / f"arm-{mode}.json").unlink()
    diff = largest_difference(out / "runs" / "off" / "final_model.pt", out / "runs" / "he" / "final_model.pt")
    summary = {"settings": raw, "off": results["off"], "he": results["he"], "largest_difference": diff,
               "dice_difference": abs(results["he"]["mean_dice"] - results["off"]["mean_dice"])}
    atomic_write_json(out / "he.json", summary)
    for mode in ("off", "he"):
        r = results[mode]
        print(f"{mode:>3}: mean Dice {r['mean_dice']:.4f}  {r['seconds_per_round']:.1f} s/round  "
              f"up {r['bytes_up_per_site_round'] / 1e6:.2f} MB  down {r['bytes_down_per_site_round'] / 1e6:.2f} MB "
              f"per site and round  peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"largest parameter difference {diff:.3g}; Dice difference {summary['dice_difference']:.4f}")
    print(f"Wrote {out / 'he.json'}")
    return 0 if np.isfinite(diff) else 1


if __name__ == "__main__":
    sys.exit(main())
