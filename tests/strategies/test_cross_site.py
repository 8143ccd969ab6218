"""Cross-site evaluation matrix: global and local-only models at every site and the unseen site."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies import RunDirectory, build_strategy
from strategies.cross_site import summarise

from .fakes import small_settings, FakeGrid
from .sites import LeastSquaresSite, initial_model, make_problem


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _local_model(site, epochs, lr):
    """What the site returns for a local-baseline request, computed by calling it directly."""
    cfg = ConfigRecord({"local-baseline": True, "local-epochs": epochs, "lr": lr, "server-round": 0})
    msg = Message(content=RecordDict({"arrays": _record(initial_model()), "config": cfg}),
                  dst_node_id=1, message_type="train")
    return {k: v.numpy() for k, v in site(msg).array_records["arrays"].items()}


def test_cross_site_matrix_with_local_baselines_and_unseen_site(tmp_path):
    data = make_problem(4, seed=21)
    unseen = data[3]
    sites = {i + 1: LeastSquaresSite(f"site-{i + 1}", a, y, local_steps=5, unseen=unseen)
             for i, (a, y) in enumerate(data[:3])}
    settings = small_settings(num_server_rounds=2, local_epochs=2, lr=0.02, min_available_sites=1, cross_site=True,
                                local_baselines=True, unseen_site=True)
    strategy = build_strategy(settings, RunDirectory(tmp_path / "run"))
    result = strategy.run(FakeGrid(sites), _record(initial_model()))
    out = json.loads((tmp_path / "run" / "cross_site.json").read_text())
    assert out["metric"] == "dice"
    assert out["models"] == ["global", "local:site-1", "local:site-2", "local:site-3"]
    assert out["sites"] == ["site-1", "site-2", "site-3", "unseen"]
    final = {k: v.numpy() for k, v in result.arrays.items()}
    models = {"global": final}
    for i, site in sites.items():
        models[f"local:site-{i}"] = _local_model(LeastSquaresSite("x", site.a, site.y, local_steps=5),
                                                  epochs=2 * 2, lr=0.02)
    by_name = {s.name: s for s in sites.values()}
    for row, model in zip(out["matrix"], out["models"]):
        for value, col in zip(row, out["sites"]):
            if col == "unseen":
                expected = 1 / (1 + by_name["site-1"].loss(models[model], *unseen))
            else:
                expected = 1 / (1 + by_name[col].loss(models[model]))
            assert value == pytest.approx(expected, rel=1e-9), (model, col)
    m = np.array(out["matrix"], dtype=float)
    diag = [m[1 + i, i] for i in range(3)]
    off = [m[1 + i, j] for i in range(3) for j in range(3) if i != j]
    assert out["summary"]["mean_diagonal"] == pytest.approx(np.mean(diag))
    assert out["summary"]["mean_off_diagonal"] == pytest.approx(np.mean(off))
    assert out["summary"]["global_unseen"] == pytest.approx(m[0, 3])
    # local-only models do better at home than away on these heterogeneous sites
    assert out["summary"]["mean_diagonal"] > out["summary"]["mean_off_diagonal"]


def test_periodic_cross_site_and_refused_local_baseline(tmp_path):
    data = make_problem(2, seed=22)
    sites = {i + 1: LeastSquaresSite(f"site-{i + 1}", a, y, local_steps=5) for i, (a, y) in enumerate(data)}
    real = sites[2]

    def refusing(msg):  # site-2 refuses any training beyond the federation (e.g. DP budget)
        if msg.content.config_records["config"].get("local-baseline"):
            return RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1}),
                               "site": ConfigRecord({"site-name": "site-2", "refused-reason": "privacy budget"})})
        return real(msg)

    sites[2] = refusing
    settings = small_settings(num_server_rounds=4, lr=0.02, min_available_sites=1, cross_site_every=2,
                                local_baselines=True)
    strategy = build_strategy(settings, RunDirectory(tmp_path / "run"))
    strategy.run(FakeGrid(sites), _record(initial_model()))
    periodic = sorted(p.name for p in (tmp_path / "run" / "cross_site").iterdir())
    assert periodic == ["round-00002.json"]  # round 4 is the end of the run: cross_site.json
    out = json.loads((tmp_path / "run" / "cross_site.json").read_text())
    assert out["models"] == ["global", "local:site-1"]
    assert out["excluded"]["local:site-2"].startswith("refused")


def test_summarise_skips_missing_entries():
    s = summarise(["global", "local:a", "local:b"], ["a", "b"], [[0.5, None], [0.9, 0.1], [None, 0.8]])
    assert s["mean_diagonal"] == pytest.approx(0.85)
    assert s["mean_off_diagonal"] == pytest.approx(0.1)
    assert s["global_mean"] == pytest.approx(0.5)
