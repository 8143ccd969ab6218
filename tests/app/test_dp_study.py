"""DP-SGD through the real ClientApp and strategy: cumulative epsilon, ledger across runs, refusal,
dp-required. In-process grid, tiny volumes."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from app.client_app import app as client_app
from app.server_app import run_study
from bench.local_grid import LocalGrid
from privacy import PrivacyLedger
from strategies import NoSiteTrained

TINY = {
    "num-server-rounds": 2, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16",
    "channels": "4,8,16", "batch-size": 2, "cross-site": False, "demo-sites": 2,
}


def _run(home, run_dir, nobody_trains=False, **extra):
    raw = {**TINY, "home": str(home), "run-dir": str(run_dir), **extra}
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], raw)
    if nobody_trains:  # a run in which no site trained fails, without a model written as if trained
        with pytest.raises(NoSiteTrained):
            run_study(grid, raw, run_id=11)
        assert json.loads((run_dir / "failed.json").read_text())["status"] == "failed"
        assert not (run_dir / "final_model.pt").exists() and not (run_dir / "checkpoints" / "best.pt").exists()
        assert "status | failed" in (run_dir / "report.md").read_text()
    else:
        run_study(grid, raw, run_id=11)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    first = _run(home, home / "run1", **{"dp-epsilon": 4.0})
    second = _run(home, home / "run2", nobody_trains=True, **{"dp-epsilon": 4.0})
    return home, first, second


def test_epsilon_is_cumulative_and_matches_an_independent_accountant(dp_runs):
    _, first, _ = dp_runs
    train = [r for r in first if r["phase"] == "train"]
    assert len(train) == 2
    for site in ("site-a", "site-b"):
        m1, m2 = train[0]["sites"][site], train[1]["sites"][site]
        assert 0 < m1["dp-epsilon-spent"] < m2["dp-epsilon-spent"] <= 4.0 + 1e-6
        accountant = RDPAccountant()
        accountant.history = [(m1["dp-noise-multiplier"], m1["dp-sample-rate"], int(m1["dp-steps"])),
                              (m2["dp-noise-multiplier"], m2["dp-sample-rate"], int(m2["dp-steps"]))]
        assert m2["dp-epsilon-spent"] == pytest.approx(accountant.get_epsilon(m2["dp-delta"]), rel=1e-6)
        assert m1["num-examples"] == 4  # cases, not Poisson batches


def test_the_ledger_spans_runs_and_an_exhausted_site_refuses(dp_runs):
    home, first, second = dp_runs
    ledgers = list((home / "site-state" / "site-a").rglob("ledger-*.json"))
    assert len(ledgers) == 1  # one ledger per dataset, in the site's own state folder
    train = [r for r in second if r["phase"] == "train"]
    excluded = train[0]["excluded"]
    assert set(excluded) == {"site-a", "site-b"}
    assert all("privacy" in reason for reason in excluded.values())
    assert all(m["num-examples"] == 0 for m in train[0]["sites"].values())
    # the strategy no longer samples sites whose budget is gone: nobody trains in round 2
    assert train[1]["sites"] == {}
    final_first = [r for r in first if r["phase"] == "train"][-1]["sites"]["site-a"]["dp-epsilon-spent"]
    assert final_first <= 4.0 + 1e-6


def test_dp_required_rejects_sites_without_dp(tmp_path):
    records = _run(tmp_path, tmp_path / "run", nobody_trains=True, **{"dp-required": True, "num-server-rounds": 1})
    excluded = records[0]["excluded"]
    assert set(excluded) == {"site-a", "site-b"}
    assert all("dp-required" in reason for reason in excluded.values())
