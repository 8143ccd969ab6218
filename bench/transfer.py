"""Federated transfer learning on the demo: pretrain on the CT hospitals, fine-tune on the MR domain.

    python -m bench.transfer --out DIR [--quick] [--rounds N] [--pretrain-rounds N] [--dp-epsilon 8]
                             [--run-config 'k=v ...']

1. ``pretrain-ct``: FedAvg on the demo's CT sites (site-a, site-b, site-c; ``--quick``: site-a, site-b).
2. The demo has one MR hospital (site-d). Its cases are split by ``fedimaging split --by iid`` into
   two SIMULATED sites (same scanner and population: ``split.json`` says so), so the MR studies are
   federated. On those two sites, at equal rounds:

   - ``mr-scratch``: FedAvg from a random initialisation;
   - ``mr-transfer``: FedAvg with ``init-from=<pretrain-ct's final_model.pt>``;
   - ``mr-dp-scratch``: DP-SGD at every site (``dp-epsilon``, default 8, all of it for this study:
     ``dp-study-epsilon`` the same, since the sites are fresh) from scratch;
   - ``mr-dp-transfer-freeze``: DP-SGD with ``init-from`` and ``freeze=encoder`` (only the decoder
     trains, is noised and travels).

Every arm is a real study (``run_study`` with the real ClientApp on ``bench.local_grid``); its run
directory is kept in ``DIR/runs/<arm>/``. ``DIR/transfer.json`` has per arm: ``site_dice``,
``mean_dice`` (test-case weighted), ``curve`` (aggregate Dice per evaluated round, from
``metrics.jsonl``), ``seconds``, ``epsilon_spent`` (per site, DP arms), ``trainable_parameters`` and
``sent_values`` (values in a site's reply). ``DIR/transfer.md`` has the table and the goals (printed,
not asserted): transfer >= scratch, DP transfer+freeze >= DP scratch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from app.config import parse_run_config
from bench.demo_study import parse_overrides, run_federated
from data_prep.demo import DEMO_PROFILES, ensure_demo_site
from data_prep.split import split_dataset
from fedimaging.io import atomic_write_json, atomic_write_text
from tasks import get_task

CT_SITES = [name for name, p in DEMO_PROFILES.items() if p.modality == "CT" and p.n_train > 0]
MR_SITE = next(name for name, p in DEMO_PROFILES.items() if p.modality == "MR")
MR_SPLIT_SITES = 2
ARMS = ("pretrain-ct", "mr-scratch", "mr-transfer", "mr-dp-scratch", "mr-dp-transfer-freeze")
QUICK = {"demo-size": "small", "local-epochs": 1, "demo-sites": 2}  # pretrain on site-a and site-b only


def mr_sites(raw: dict[str, Any], out: Path) -> tuple[Path, dict]:
    """The demo's MR hospital split into ``MR_SPLIT_SITES`` simulated sites under ``out``; (dir, split.json)."""
    run = parse_run_config(raw)
    source = ensure_demo_site(run.demo_root_path, MR_SITE, run.seed, run.task, run.demo_size)
    summary = split_dataset(source, out, MR_SPLIT_SITES, by="iid", test_fraction=0.25, seed=run.seed, force=True)
    return out, summary


def parameter_counts(raw: dict[str, Any]) -> dict[str, int]:
    """Trainable parameters and the values a site sends back (everything not frozen) for ``raw``'s model."""
    run = parse_run_config(raw)
    task = get_task(run.task, run.task_settings())
    model = task.build_model()
    frozen = task.frozen_names(model)
    return {"trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n not in frozen),
            "sent_values": sum(t.numel() for n, t in model.state_dict().items() if n not in frozen)}


def epsilon_spent(run_dir: Path) -> dict[str, float]:
    """Each site's cumulative epsilon, from the last train phase of ``metrics.jsonl``."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["phase"] == "train" and r.get("sites")][-1]["sites"]
    return {s: float(m["dp-epsilon-spent"]) for s, m in last.items() if "dp-epsilon-spent" in m}


def arm(raw: dict[str, Any], n_sites: int, run_dir: Path) -> dict[str, Any]:
    """One study, summarised."""
    run = parse_run_config(raw)
    result = run_federated(raw, n_sites, run_dir, get_task(run.task, run.task_settings()).best_metric)
    weights = result.pop("test_cases")
    result["mean_dice"] = float(np.average([result["site_dice"][s] for s in weights], weights=list(weights.values())))
    result["test_cases"] = weights
    result.update(parameter_counts(raw))
    if float(raw.get("dp-epsilon", 0) or 0) > 0:
        result["epsilon_spent"] = epsilon_spent(Path(result["run_dir"]))
    return result


def arm_configs(base: dict[str, Any], out: Path, sites_dir: Path, pretrained: Path, epsilon: float) -> dict[str, dict]:
    """Run config of each fine-tuning arm (the MR sites, own state root each)."""
    mr = {**base, "demo": False, "data-path-template": str(sites_dir / "{site}"),
          "min-available-sites": MR_SPLIT_SITES, "cross-site": False}
    dp = {"dp-epsilon": epsilon, "dp-study-epsilon": epsilon}  # fresh sites: the study may spend all of it
    transfer = {"init-from": str(pretrained)}
    extra = {"mr-scratch": {}, "mr-transfer": transfer, "mr-dp-scratch": dp,
             "mr-dp-transfer-freeze": {**dp, **transfer, "freeze": "encoder"}}
    return {name: {**mr, **more, "state-root": str(out / "state" / name)} for name, more in extra.items()}


def goals(results: dict[str, dict]) -> list[str]:
    def line(a: str, b: str) -> str:
        x, y = results[a]["mean_dice"], results[b]["mean_dice"]
        return f"{a} ({x:.3f}) >= {b} ({y:.3f}) at equal rounds: {'met' if x >= y else 'not met'}"

    return [line("mr-transfer", "mr-scratch"), line("mr-dp-transfer-freeze", "mr-dp-scratch")]


def table(results: dict[str, dict]) -> str:
    rows = ["| arm | sites | per-site Dice | mean Dice | curve | epsilon spent (max) | trainable / sent | seconds |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sites = ", ".join(f"{s} {v:.3f}" for s, v in r["site_dice"].items())
        curve = " ".join(f"{v:.3f}" for v in r["curve"] if isinstance(v, (int, float)))
        eps = f"{max(r['epsilon_spent'].values()):.2f}" if r.get("epsilon_spent") else "no DP"
        rows.append(f"| {name} | {len(r['site_dice'])} | {sites} | {r['mean_dice']:.3f} | {curve} | {eps} | "
                    f"{r['trainable_parameters']} / {r['sent_values']} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def write_report(out: Path, report: dict[str, Any]) -> None:
    results, lines = report["results"], report["goals"]
    header = (f"Pretrain: FedAvg on {', '.join(report['ct_sites'])}, rounds: {report['pretrain_rounds']}. Fine-tune: "
              f"{MR_SITE} (MR) split into {MR_SPLIT_SITES} SIMULATED sites (one scanner), rounds per arm: "
              f"{report['rounds']}; DP arms: epsilon {report['dp_epsilon']:g} per site for the study.")
    atomic_write_json(out / "transfer.json", report)
    atomic_write_text(out / "transfer.md", "# Federated transfer learning on the demo (CT -> MR)\n\n" + header
                      + "\n\n" + table(results) + "\n\n" + "\n".join(f"- {g}" for g in lines) + "\n")


def _log(name: str, result: dict[str, Any]) -> None:
    print(json.dumps({"arm": name, "mean_dice": result["mean_dice"]}), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="small demo, 1 round per study, 2 CT sites")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every MR arm (default 10; quick 1)")
    parser.add_argument("--pretrain-rounds", type=int, default=None, help="rounds of pretrain-ct (default --rounds)")
    parser.add_argument("--dp-epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--run-config", default="", help="overrides for every arm, as flwr run --run-config")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 10)
    pretrain_rounds = args.pretrain_rounds if args.pretrain_rounds is not None else rounds
    if rounds < 1 or pretrain_rounds < 1 or args.dp_epsilon <= 0:
        parser.error("--rounds and --pretrain-rounds must be >= 1 and --dp-epsilon > 0")
    out = args.out.resolve()
    base = {**(QUICK if args.quick else {}), "task": "segmentation", "strategy": "fedavg", "seed": args.seed,
            "home": str(out / "home"), "num-server-rounds": rounds, **parse_overrides(args.run_config)}
    n_ct = int(base.get("demo-sites", len(CT_SITES)))
    if not 1 <= n_ct <= len(CT_SITES):
        parser.error(f"demo-sites={n_ct}: the pretraining sites are the first 1..{len(CT_SITES)} of the CT sites {CT_SITES}")
    ct_sites = CT_SITES[:n_ct]

    results: dict[str, dict] = {}
    pretrain = {**base, "demo-sites": n_ct, "cross-site": False, "num-server-rounds": pretrain_rounds,
                "state-root": str(out / "state" / "pretrain-ct")}
    results["pretrain-ct"] = arm(pretrain, n_ct, out / "runs" / "pretrain-ct")
    _log("pretrain-ct", results["pretrain-ct"])
    sites_dir, split = mr_sites(base, out / "mr-sites")
    pretrained = Path(results["pretrain-ct"]["run_dir"]) / "final_model.pt"
    for name, raw in arm_configs(base, out, sites_dir, pretrained, args.dp_epsilon).items():
        results[name] = arm(raw, MR_SPLIT_SITES, out / "runs" / name)
        _log(name, results[name])

    lines = goals(results)
    write_report(out, {
        "quick": args.quick, "rounds": base["num-server-rounds"], "pretrain_rounds": pretrain_rounds,
        "dp_epsilon": args.dp_epsilon, "ct_sites": ct_sites,
        "mr_sites": {"source": MR_SITE, "simulated_split": {k: split[k] for k in ("method", "seed", "counts", "note")}},
        "settings": {k: v for k, v in base.items() if k != "home"}, "results": results, "goals": lines})
    for g in lines:
        print(g, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
