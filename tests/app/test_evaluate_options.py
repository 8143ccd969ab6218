"""evaluate-every and evaluate-received: fewer evaluate messages, the same numbers."""

from __future__ import annotations

import math

import pytest

from app.client_app import app as client_app
from app.server_app import run_study
from bench.local_grid import LocalGrid
from strategies import RunDirectory
from tests.conftest import share_demo

TINY = {
    "num-server-rounds": 3, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6",
    "roi-size": "16,16,16", "channels": "4,8,16", "crops-per-case": 1, "batch-size": 2,
    "cross-site": False, "torch-threads": 1, "evaluate-every": 2, "evaluate-received": True,
}

_shared_demo = share_demo(TINY)  # the suite's demo sites (tests/conftest.py)


class CountingGrid(LocalGrid):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend((m.metadata.message_type, int(m.content["config"].get("server-round", 0)))
                         for m in messages if "config" in m.content)
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    raw = {**TINY, "home": str(home), "run-dir": str(home / "run")}
    grid = CountingGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], raw)
    run_dir = run_study(grid, raw, run_id=3)
    return grid.sent, RunDirectory(run_dir).read_metrics()


def test_evaluate_phase_runs_every_n_rounds_and_after_the_last(study):
    sent, lines = study
    evaluated = sorted({r for kind, r in sent if kind == "evaluate"})
    assert evaluated == [2, 3]  # round 1 skipped (2 | 2), round 3 is the last
    assert sum(1 for kind, _ in sent if kind == "evaluate") == 2 * 3  # no process per site in round 1
    assert sorted(r["round"] for r in lines if r["phase"] == "evaluate" and r.get("sites")) == [2, 3]


def test_received_metrics_equal_the_previous_rounds_evaluation(study):
    """A train reply's received-* of round r is the evaluate phase of round r-1, site by site."""
    _, lines = study
    evaluate = {r["round"]: r for r in lines if r["phase"] == "evaluate" and r.get("sites")}
    train = {r["round"]: r for r in lines if r["phase"] == "train"}
    before = evaluate[2]["sites"]
    after = train[3]["sites"]
    assert set(before) == set(after) == {"site-a", "site-b", "site-c"}
    for site, metrics in before.items():
        for key in ("dice", "loss", "num-examples"):
            got, want = after[site][f"received-{key}"], metrics[key]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6) or (math.isnan(got) and math.isnan(want))
    # the aggregate is weighted by test cases, like the evaluate phase's
    assert train[3]["aggregate"]["received-dice"] == pytest.approx(evaluate[2]["aggregate"]["dice"], rel=1e-5)
    assert all("received-dice" in m for m in train[1]["sites"].values())  # round 1: the initial model
    assert train[3]["received-model"].endswith("after round 2")  # metrics.jsonl says what they measure
    from app.report import _evaluation_schedule

    text = " ".join(_evaluation_schedule({"evaluate-every": 2, "evaluate-received": True}))
    assert "every 2 rounds" in text and "previous round" in text
