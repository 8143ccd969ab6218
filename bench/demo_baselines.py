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
import sys
import tempfile
from pathlib import Path

import torch

from bench.demo_study import federated_arm, local_arm, parse_overrides, pooled_arm, prepare


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
    raw = {"seed": args.seed, "demo-size": args.size, "home": str(out / "home"), **parse_overrides(args.run_config)}
    if args.rounds is not None:
        raw["num-server-rounds"] = args.rounds
    if args.local_epochs is not None:
        raw["local-epochs"] = args.local_epochs
    study = prepare(raw)
    if study.run.task != "segmentation":
        raise SystemExit("bench.demo_baselines compares segmentation models (task=segmentation)")
    torch.set_num_threads(study.run.torch_threads or torch.get_num_threads())

    results = {"pooled": pooled_arm(study)}
    print(json.dumps({"pooled": results["pooled"]["site_dice"]}), file=sys.stderr, flush=True)
    results["local"] = local_arm(study)
    print(json.dumps({"local": results["local"]["site_dice"]}), file=sys.stderr, flush=True)
    results["fedavg"] = federated_arm(study, out / "fedavg", strategy="fedavg")
    report = {
        "benchmark": "demo_baselines",
        "config": {"rounds": study.run.num_server_rounds, "local_epochs": study.run.local_epochs,
                   "epochs_total": study.epochs, "seed": study.run.seed, "demo_size": study.run.demo_size,
                   "sites": study.sites, "test_cases": study.test_cases, "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_baselines.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
