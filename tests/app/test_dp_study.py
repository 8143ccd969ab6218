"""DP-SGD through the real ClientApp and strategy: cumulative epsilon, a per-study share of a
site's lifetime budget across runs, refusal with a reason code, dp-required. In-process grid,
tiny volumes (four short studies in a row: slow on a busy machine)."""

from __future__ import annotations

import json
import shutil

import pytest
from opacus.accountants import RDPAccountant

from app.client_app import app as client_app
from app.server_app import run_study
from bench.local_grid import LocalGrid
from privacy import PrivacyLedger
from strategies import NoSiteTrained
from tests.conftest import share_demo

pytestmark = pytest.mark.slow

TINY = {
    "num-server-rounds": 2, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16",
    "channels": "4,8,16", "batch-size": 2, "cross-site": False, "demo-sites": 2,
}

_shared_demo = share_demo(TINY)  # the suite's demo sites (tests/conftest.py)


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
    """Four studies in a row at the same two sites (lifetime budget 4): a smoke test asking for 1,
    a study asking for nothing (a quarter of 4), one asking for all that is left, one too many."""
    home = tmp_path_factory.mktemp("home")
    smoke = _run(home, home / "run1", **{"dp-epsilon": 4.0, "dp-study-epsilon": 1.0})
    default = _run(home, home / "run2", **{"dp-epsilon": 4.0, "num-server-rounds": 1})
    rest = _run(home, home / "run3", **{"dp-epsilon": 4.0, "dp-study-epsilon": 4.0, "num-server-rounds": 1})
    late = _run(home, home / "run4", nobody_trains=True, **{"dp-epsilon": 4.0, "dp-study-epsilon": 1.0})
    return home, smoke, default, rest, late


def _train(records):
    return [r for r in records if r["phase"] == "train"]


def test_epsilon_is_cumulative_and_matches_an_independent_accountant(dp_runs):
    _, first, *_ = dp_runs
    train = _train(first)
    assert len(train) == 2
    for site in ("site-a", "site-b"):
        m1, m2 = train[0]["sites"][site], train[1]["sites"][site]
        assert 0 < m1["dp-epsilon-spent"] < m2["dp-epsilon-spent"] <= 1.0 + 1e-6  # the study's share
        assert m2["dp-study-epsilon"] == 1.0 and m2["dp-study-epsilon-spent"] == pytest.approx(m2["dp-epsilon-spent"])
        accountant = RDPAccountant()
        accountant.history = [(m1["dp-noise-multiplier"], m1["dp-sample-rate"], int(m1["dp-steps"])),
                              (m2["dp-noise-multiplier"], m2["dp-sample-rate"], int(m2["dp-steps"]))]
        assert m2["dp-epsilon-spent"] == pytest.approx(accountant.get_epsilon(m2["dp-delta"]), rel=1e-6)
        assert m1["num-examples"] == 4  # cases, not Poisson batches


def test_a_smoke_test_leaves_budget_for_the_next_studies(dp_runs):
    """Issue 19 item 3: the study after a 2-round trial still trains, at every site."""
    home, smoke, default, rest, _ = dp_runs
    assert (home / "site-state" / "site-a" / "privacy" / "ledger.json").is_file()  # one ledger per site
    for records in (default, rest):
        for record in _train(records):
            assert record["excluded"] == {} and set(record["sites"]) == {"site-a", "site-b"}
    for site in ("site-a", "site-b"):
        after_smoke = _train(smoke)[-1]["sites"][site]["dp-epsilon-spent"]
        second = _train(default)[-1]["sites"][site]
        assert second["dp-study-epsilon"] == 1.0  # nothing asked: a quarter of the lifetime 4
        assert 0.98 < second["dp-study-epsilon-spent"] <= 1.0
        assert after_smoke < second["dp-epsilon-spent"] < after_smoke + 1.0  # composes, sub-additively
        third = _train(rest)[-1]["sites"][site]
        assert 4.0 - 0.011 < third["dp-epsilon-spent"] <= 4.0 + 1e-9  # all that was left, never more


def test_a_site_with_nothing_left_refuses_with_a_reason_code(dp_runs):
    *_, late = dp_runs
    train = _train(late)
    assert train[0]["excluded"] == {"site-a": "refused: privacy-budget-exhausted",
                                    "site-b": "refused: privacy-budget-exhausted"}
    assert all(m["num-examples"] == 0 for m in train[0]["sites"].values())
    # the strategy no longer samples sites whose budget is gone: nobody trains in round 2
    assert train[1]["sites"] == {}


def test_a_site_whose_ledger_was_deleted_refuses_with_a_code_and_no_path(dp_runs, tmp_path):
    """Issue 18 item 1: a deleted ledger is no fresh start; the server learns a code, never the file."""
    home = dp_runs[0]
    state = tmp_path / "site-state"
    shutil.copytree(home / "site-state", state)
    (state / "site-a" / "privacy" / "ledger.json").unlink()
    records = _run(home, tmp_path / "run", nobody_trains=True,
                   **{"dp-epsilon": 4.0, "dp-study-epsilon": 0.1, "num-server-rounds": 1, "state-root": str(state)})
    assert _train(records)[0]["excluded"] == {"site-a": "refused: privacy-ledger-error",
                                              "site-b": "refused: privacy-budget-exhausted"}


def test_dp_required_rejects_sites_without_dp(tmp_path):
    records = _run(tmp_path, tmp_path / "run", nobody_trains=True, **{"dp-required": True, "num-server-rounds": 1})
    excluded = records[0]["excluded"]
    assert set(excluded) == {"site-a", "site-b"}
    assert all("dp-required" in reason for reason in excluded.values())
