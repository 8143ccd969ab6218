"""Real loopback deployments (TLS, auth, start scripts) with DP sites and restarts.

- DP in every node config: each site's ledger is written in its state-dir; a SuperNode killed
  mid-round is excluded from that round while the study goes on, and restarted it continues with
  its ledger (epsilon keeps growing, never restarts at 0) and its preprocessed cache (no case is
  preprocessed again); a site whose budget is already spent refuses with a reason code and is
  excluded.
- A SuperLink killed after a round and restarted with ``resume-from`` ends with the same final
  model as an uninterrupted run of the same seed.

Slow (minutes on a shared machine): tiny model, 2-3 rounds, no per-round evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.client_app import app as client_app
from app.server_app import run_study
from bench.deploy import timing_lines
from bench.local_grid import LocalGrid
from data_prep.demo import write_demo_site
from tasks.cache import cache_dir_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {
    "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16", "channels": "4,8",
    "num-res-units": 0, "crops-per-case": 1, "local-epochs": 1, "batch-size": 2, "torch-threads": 1,
    "cross-site": False, "seed": 3, "demo": False, "fraction-evaluate": 0.0, "lr-schedule": "constant",
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-data")
    return {s: write_demo_site(root / s, s, seed=11, size="small") for s in ("site-a", "site-b", "site-c")}


@pytest.fixture
def federations(make_federation):
    """Loopback federations (tests/integration/conftest.py) whose sites print their timing lines."""
    return lambda sites, **kwargs: make_federation(sites, extra_env={"FEDIMAGING_TIMINGS": "1"}, **kwargs)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _train_lines(run_dir: Path) -> list[dict]:
    return [r for r in _metrics(run_dir) if r["phase"] == "train"]


def _start(fed, sites, **names):
    procs = {s: fed.start_site(s, name=names.get(s)) for s in sites}
    for proc in procs.values():
        fed.wait_for_log(proc, "SuperNode ID", 180)
    return procs


def _restart(fed, site: str, timeout: float = 400.0):
    """Start ``site`` again; the SuperLink refuses its key until it has noticed the old one is gone."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        proc = fed.start_site(site, name=f"{site}-restarted-{attempt}")
        try:
            fed.wait_for_log(proc, "SuperNode ID", 180)
            return proc
        except RuntimeError:
            if "already online" not in proc.log() or time.monotonic() > deadline:
                raise
            time.sleep(10)


def _spend_whole_budget(data: Path, state_dir: Path, epsilon: float, home: Path) -> None:
    """One in-process DP study at ``site-c`` that spends all of its lifetime budget."""
    raw = {**TINY, "num-server-rounds": 1, "min-available-sites": 1, "dp-required": True,
           "dp-study-epsilon": epsilon, "home": str(home), "run-dir": str(home / "spend")}
    node = {"data-path": str(data), "site-name": "site-c", "state-dir": str(state_dir), "dp-epsilon": epsilon}
    run_study(LocalGrid(client_app, [node], raw), raw, run_id=1)


def test_dp_sites_keep_ledger_and_cache_across_a_supernode_restart(federations, datasets, tmp_path):
    epsilon = 8.0
    fed = federations(datasets, dp_epsilon=epsilon)
    state = {s: fed.workdir / "state" / s for s in datasets}
    _spend_whole_budget(datasets["site-c"], state["site-c"], epsilon, tmp_path / "spend-home")
    fed.start_superlink()
    assert fed.register().returncode == 0
    procs = _start(fed, datasets)
    run_dir = tmp_path / "run"
    config = {**TINY, "num-server-rounds": 3, "min-available-sites": 3, "dp-required": True,
              "dp-study-epsilon": 2.0, "run-dir": str(run_dir),
              "round-timeout-s": 300.0}  # a safety net: Flower reports a dead node after about 60 s
    run = fed.run_study(config)
    # round 2 has reached site-a: the hospital's SuperNode dies (SIGKILL, its ClientApp too) mid-round
    victim = procs["site-a"]
    fed.wait_until(lambda: victim.log().count("Receiving: train message") >= 2 or not run.alive(), 900,
                   "site-a to receive the round-2 train message")
    assert [r["round"] for r in _train_lines(run_dir)] == [1]
    fed.stop(victim, sig_kill=True)
    ledger = state["site-a"] / "privacy" / "ledger.json"
    assert ledger.is_file()
    entries_before = sorted(p.name for p in cache_dir_for(state["site-a"]).glob("*.pt"))
    assert entries_before  # round 1 built the cache
    restarted = _restart(fed, "site-a")  # and is started again
    assert run.wait(1200) == 0, fed.logs_tail()

    train = _train_lines(run_dir)
    assert [r["round"] for r in train] == [1, 2, 3]
    # the killed site is excluded from round 2 and the round goes on with the others
    assert "site-a" in train[1]["excluded"] or any("node-" in k for k in train[1]["excluded"]), train[1]
    assert train[1]["sites"].get("site-b", {}).get("num-examples", 0) > 0
    # the spent site refuses with a code (no number, no path), is excluded, and never trains
    assert train[0]["excluded"].get("site-c") == "refused: privacy-budget-exhausted"
    for line in train:
        assert "site-c" not in line["sites"] or line["sites"]["site-c"].get("num-examples", 0) == 0
    trained_after = [r for r in train if r["round"] >= 2 and "site-a" in r["sites"]
                     and r["sites"]["site-a"].get("num-examples", 0) > 0]
    assert trained_after, "site-a did not train after its restart"
    spent = [r["sites"]["site-a"]["dp-epsilon-spent"] for r in train if "dp-epsilon-spent" in r["sites"].get("site-a", {})]
    assert spent == sorted(spent) and spent[0] > 0 and spent[-1] > spent[0]  # the ledger was kept, not restarted
    assert spent[-1] <= 2.0 + 1e-6  # never more than the study's share
    # the restarted SuperNode's processes read the cache round 1 built: nothing was preprocessed again
    records = [r for r in timing_lines(restarted.log()) if r["message"] == "train"]
    assert records and all(r["cache_misses"] == 0 and r["cache_hits"] > 0 for r in records)
    assert sorted(p.name for p in cache_dir_for(state["site-a"]).glob("*.pt")) == entries_before
    for site, folder in datasets.items():  # nothing of the cache or ledger in a dataset folder
        assert not [p for p in folder.rglob("*") if p.suffix == ".pt" or p.name.startswith("ledger")], site


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)


def test_superlink_restart_with_resume_gives_the_uninterrupted_model(federations, datasets, tmp_path):
    """Bitwise: replies are averaged sorted by site name (not in arrival order), every site's round is
    seeded by (seed, site, round), one torch thread on CPU, cached preprocessing equals fresh
    preprocessing and the server state is saved losslessly. (GPU kernels that are not deterministic
    would break this; then a tolerance would be the honest test.)"""
    sites = {s: datasets[s] for s in ("site-a", "site-b")}
    config = {**TINY, "num-server-rounds": 2, "min-available-sites": 2}
    # Uninterrupted reference: the same ClientApp and ServerApp code, in process, same seed and data.
    ref_home = tmp_path / "reference"
    raw = {**config, "home": str(ref_home), "run-dir": str(ref_home / "run")}
    nodes = [{"data-path": str(d), "site-name": s, "state-dir": str(ref_home / "state" / s)} for s, d in sites.items()]
    reference = _final_model(run_study(LocalGrid(client_app, nodes, raw), raw, run_id=1))

    fed = federations(sites)
    link = fed.start_superlink()
    assert fed.register().returncode == 0
    _start(fed, sites)
    run_dir = tmp_path / "run"
    run = fed.run_study({**config, "run-dir": str(run_dir)})
    fed.wait_until(lambda: (run_dir / "server_state" / "latest.json").exists() or not run.alive(), 900,
                   "round 1 to be saved")
    fed.stop(link, sig_kill=True)
    fed.stop(run)
    assert max(r["round"] for r in _metrics(run_dir)) == 1  # killed between rounds 1 and 2
    fed.start_superlink(name="superlink-restarted")
    resumed = fed.run_study({**config, "resume-from": str(run_dir)}, name="flwr-run-resume")
    assert resumed.wait(1200) == 0, fed.logs_tail()
    model = _final_model(run_dir)
    assert set(model) == set(reference)
    worst = max(float((model[k].double() - reference[k].double()).abs().max()) for k in model)
    assert all(torch.equal(model[k], reference[k]) for k in model), f"max abs difference {worst:.3g}"
    assert np.isfinite(worst) and any(float(v.abs().sum()) > 0 for v in model.values())
