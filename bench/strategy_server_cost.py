"""Server-side cost of each strategy per round, for a model of realistic size (no sites, no MONAI).

    python -m bench.strategy_server_cost [--params 4800000] [--sites 5] [--rounds 3] [--strategies fedavg,scaffold]

Sites are simulated by a Grid that answers every train message with the global model plus noise
(and a SCAFFOLD delta-c), so what is timed is only the server: reply screening, aggregation,
metrics line (``aggregate_train``) and the end-of-round checkpoint + server state. Prints one JSON
object: per strategy, seconds per round for each part and the run directory size. Timings depend
on the disk (fsync) and on other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from app.config import parse_run_config, strategy_settings
from strategies import STRATEGIES, RunDirectory, build_strategy


def synthetic_model(num_params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """~20 float32 tensors totalling ``num_params`` plus BatchNorm-like buffers."""
    rng = np.random.default_rng(seed)
    sizes = np.full(20, num_params // 20)
    sizes[-1] += num_params - sizes.sum()
    model = {f"layer{i}.weight": rng.normal(size=int(n)).astype(np.float32) for i, n in enumerate(sizes)}
    model["norm.running_mean"] = np.zeros(16, np.float32)
    model["norm.num_batches_tracked"] = np.array(0, np.int64)
    return model


class SyntheticGrid(Grid):
    """Every node answers instantly: global + noise, num-examples and loss; evaluate: dice."""

    def __init__(self, num_sites: int, seed: int = 0) -> None:
        self.nodes = list(range(1, num_sites + 1))
        self.rng = np.random.default_rng(seed)
        self.reply_seconds = 0.0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        t0 = time.perf_counter()
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            site = ConfigRecord({"site-name": f"site-{node}"})
            if msg.metadata.message_type == "train":
                arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
                new = {k: (v + self.rng.normal(scale=1e-3, size=v.shape).astype(v.dtype)
                           if v.dtype.kind == "f" else v) for k, v in arrays.items()}
                content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}),
                                      "metrics": MetricRecord({"num-examples": 10 * node, "loss": 1.0 / node}),
                                      "site": site})
                if "scaffold-c" in msg.content.array_records:
                    content["scaffold-delta-c"] = ArrayRecord(
                        {k: Array(np.asarray(v - arrays[k])) for k, v in new.items()})
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 0.5, "dice": 0.5}),
                                      "site": site})
            replies.append(Message(content, reply_to=msg))
        self.reply_seconds += time.perf_counter() - t0
        return replies

    # unused parts of the Grid interface
    def set_run(self, run) -> None:  # noqa: ANN001
        pass

    @property
    def run(self):  # noqa: ANN201
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        raise NotImplementedError


def _timed(obj, name: str, totals: dict[str, float]) -> None:
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)


def bench_strategy(name: str, num_params: int, num_sites: int, rounds: int, root: Path) -> dict:
    run = parse_run_config({"strategy": name, "num-server-rounds": rounds, "cross-site": False,
                            "relative-update-norm": 3.0, "local-epochs": 1, "lr-schedule": "constant"})
    settings = strategy_settings(run, "dice", num_sites)
    local = frozenset({"norm.running_mean", "norm.num_batches_tracked"})
    strategy = build_strategy(settings, RunDirectory(root / name), local)
    totals: dict[str, float] = {}
    for method in ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate",
                   "save_server_state"):
        _timed(strategy, method, totals)
    grid = SyntheticGrid(num_sites)
    model = synthetic_model(num_params)
    t0 = time.perf_counter()
    strategy.run(grid, ArrayRecord({k: Array(v) for k, v in model.items()}))
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file())
    return {
        "seconds_per_round": {k.lstrip("_"): round(v / rounds, 4) for k, v in sorted(totals.items())},
        "server_seconds_per_round": round((wall - grid.reply_seconds) / rounds, 4),
        "run_dir_mb": round(size / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_800_000, help="model size (float32 parameters)")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # outside a Flower process
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = {"params": args.params, "sites": args.sites, "rounds": args.rounds, "strategies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out["strategies"][name] = bench_strategy(name, args.params, args.sites, args.rounds, Path(tmp))
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
