"""A personalized study (FedBN + finetune) on the in-process grid: interrupted, resumed, predicted.

Shows what a site keeps and what the server sees: personal models only under each site's
state-dir, ``personal-dice`` beside the global model's metrics in metrics.jsonl, one
``personal:<site>`` row per site in cross_site.json (at that site only), a resume that continues
the same personal files, and ``predict --personal`` loading exactly the site's latest personal model.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from app.client_app import app as client_app
from app.predict_model import load_model
from app.server_app import run_study
from bench.local_grid import LocalGrid
from fedimaging.weights import load_tensors
from tests.conftest import share_demo

TINY = {
    "num-server-rounds": 2, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6",
    "roi-size": "16,16,16", "channels": "4,8,16", "crops-per-case": 1, "batch-size": 2,
    "strategy": "fedbn", "personalization": "finetune", "torch-threads": 1,
}

_shared_demo = share_demo(TINY)  # the suite's demo sites (tests/conftest.py)


class _Crash(RuntimeError):
    pass


class CrashingGrid(LocalGrid):
    """Fails when round ``crash_round`` starts, like a SuperLink host that goes down."""

    def __init__(self, *args, crash_round=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            cfg = m.content.config_records.get("config")
            if cfg is not None and cfg.get("server-round") == self.crash_round and m.metadata.message_type == "train":
                raise _Crash("round started")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.slow
def test_personalized_study_resumes_and_keeps_personal_models_at_the_sites(tmp_path):
    raw = {**TINY, "home": str(tmp_path), "run-dir": str(tmp_path / "run")}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(_Crash):
        run_study(CrashingGrid(client_app, nodes, raw, crash_round=2), raw, run_id=3)
    states = sorted((tmp_path / "site-state").glob("site-*"))
    assert [p.name for p in states] == ["site-a", "site-b", "site-c"]
    after_one = {p.name: load_tensors(p / "runs" / "run" / "personal-round-000001.pt") for p in states}

    resumed = {**raw, "resume-from": str(tmp_path / "run")}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_study(CrashingGrid(client_app, nodes, resumed), resumed, run_id=4)

    assert "personal Dice" in out.getvalue()  # the console's round table shows both
    assert "personal Dice" in (tmp_path / "run" / "report.md").read_text()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if line["phase"] == "evaluate"]
    assert [line["round"] for line in evaluations] == [1, 2]
    for line in evaluations:  # every site's global and personal metrics, each round
        for site, metrics in line["sites"].items():
            assert 0 <= metrics["dice"] <= 1 and 0 <= metrics["personal-dice"] <= 1, (site, metrics)

    cross = json.loads((tmp_path / "run" / "cross_site.json").read_text())
    assert cross["models"] == ["global", "personal:site-a", "personal:site-b", "personal:site-c"]
    for model, row in zip(cross["models"][1:], cross["matrix"][1:]):
        own = model.split(":", 1)[1]
        for site, value in zip(cross["sites"], row):
            assert (value is not None) == (site == own), (model, site, value)
    final = {site: m["personal-dice"] for site, m in evaluations[-1]["sites"].items()}
    mine = [row[cross["sites"].index(m.split(":")[1])] for m, row in zip(cross["models"][1:], cross["matrix"][1:])]
    assert mine == pytest.approx([final[s] for s in sorted(final)])  # same model, same cases
    assert cross["summary"]["personal_mean"] == pytest.approx(sum(mine) / 3)

    for state in states:
        folder = state / "runs" / "run"
        kept = load_tensors(folder / "personal-round-000001.pt")  # the resume did not rewrite round 1
        assert all(torch.equal(kept[k], after_one[state.name][k]) for k in kept)
        latest = load_tensors(folder / "personal-round-000002.pt")
        loaded = load_model(tmp_path / "run" / "final_model.pt", site_state=state, device="cpu", personal=True)
        assert loaded.site_state == folder / "personal-round-000002.pt"
        got = loaded.model.state_dict()
        assert all(torch.equal(got[k].cpu(), latest[k]) for k in latest)
        # finetune starts again from the received global model, so rounds differ
        assert any(not torch.equal(latest[k], kept[k]) for k in latest if latest[k].is_floating_point())
