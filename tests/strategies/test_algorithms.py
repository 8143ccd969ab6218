"""Strategy variants on a federated least-squares problem with a known optimum and client drift."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies import RunDirectory, build_strategy
from strategies.aggregation import clip_update, update_norm, weighted_mean

from .fakes import small_settings, FakeGrid, reply_to, train_reply
from .sites import LeastSquaresSite, global_optimum, initial_model, make_problem


@pytest.fixture
def no_fsync(monkeypatch):
    """Durability is not under test here; fsync on a shared disk would dominate the runtime."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _numpy(record):
    return {k: v.numpy() for k, v in record.items()}


def drive(strategy, grid, arrays, rounds):
    """The train half of Flower's loop: configure_train -> sites -> aggregate_train."""
    record = _record(arrays)
    for rnd in range(1, rounds + 1):
        replies = grid.send_and_receive(strategy.configure_train(rnd, record, ConfigRecord(), grid))
        new, _ = strategy.aggregate_train(rnd, replies)
        record = new if new is not None else record
    return _numpy(record)


def _setup(tmp_path, name, data, local_keys=frozenset(), use_bias=False, **kw):
    sites = {i + 1: LeastSquaresSite(f"site-{i + 1}", a, y, local_steps=20, use_bias=use_bias, local_keys=local_keys)
             for i, (a, y) in enumerate(data)}
    settings = small_settings(strategy=name, min_available_sites=1, cross_site=False, **kw)
    return build_strategy(settings, RunDirectory(tmp_path / name), local_keys), sites


def test_scaffold_reaches_optimum_where_fedavg_plateaus(tmp_path, no_fsync):
    data = make_problem(3, seed=0)
    w_star = global_optimum(data)
    errors = {}
    for name in ("fedavg", "scaffold"):
        strategy, sites = _setup(tmp_path, name, data, lr=0.05)
        errs = []
        arrays = initial_model()
        for _ in range(4):  # 4 x 10 rounds, to see the trend
            arrays = drive(strategy, FakeGrid(sites), arrays, 10)
            errs.append(float(np.linalg.norm(arrays["w"] - w_star)))
        errors[name] = errs
    scale = float(np.linalg.norm(w_star))
    # FedAvg stalls at a biased fixed point far from w*: no progress over the last 20 rounds
    assert errors["fedavg"][-1] > 0.1 * scale
    assert abs(errors["fedavg"][-1] - errors["fedavg"][-3]) < 0.05 * errors["fedavg"][-1]
    # SCAFFOLD's control variates remove the drift: it converges to w*
    assert errors["scaffold"][-1] < 1e-4 * scale
    assert errors["scaffold"][-1] < errors["scaffold"][0]


def test_scaffold_sends_variate_and_rejects_reply_without_delta(tmp_path):
    data = make_problem(2, seed=1)
    strategy, sites = _setup(tmp_path, "scaffold", data, lr=0.05)
    grid = FakeGrid(sites)
    msgs = list(strategy.configure_train(1, _record(initial_model()), ConfigRecord(), grid))
    c = _numpy(msgs[0].content.array_records["scaffold-c"])
    assert set(c) == {"w", "b", "steps"} and not np.any(c["w"])
    reply = reply_to(1, train_reply(initial_model(), 5, "site-1", loss=1.0))  # no scaffold-delta-c
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None
    line = json.loads(strategy.run_dir.metrics_path.read_text().splitlines()[-1])
    assert "scaffold-delta-c" in line["excluded"]["site-1"]


def test_scaffold_server_update_matches_formula(tmp_path):
    from strategies.aggregation import scaffold_step

    x = {"w": np.array([1.0, 2.0])}
    c = {"w": np.array([0.5, -0.5])}
    ys = [{"w": np.array([2.0, 2.0])}, {"w": np.array([0.0, 4.0])}]
    dcs = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 3.0])}]
    weights = [1, 3]
    new_x, new_c = scaffold_step(x, weighted_mean(ys, weights), c, weighted_mean(dcs, weights),
                                 server_lr=0.5, num_sampled=2, num_total=4)
    mean_y = (1 * ys[0]["w"] + 3 * ys[1]["w"]) / 4
    mean_dc = (1 * dcs[0]["w"] + 3 * dcs[1]["w"]) / 4
    np.testing.assert_allclose(new_x["w"], x["w"] + 0.5 * (mean_y - x["w"]))
    np.testing.assert_allclose(new_c["w"], c["w"] + (2 / 4) * mean_dc)


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_reaches_sites(tmp_path, no_fsync):
    data = make_problem(3, seed=2)
    finals = {}
    for name, mu in (("fedavg", 0.0), ("fedprox", 0.0)):
        strategy, sites = _setup(tmp_path, name, data, lr=0.05, proximal_mu=mu)
        finals[name] = drive(strategy, FakeGrid(sites), initial_model(), 5)
    for key in finals["fedavg"]:
        assert finals["fedavg"][key].tobytes() == finals["fedprox"][key].tobytes()
    strategy, sites = _setup(tmp_path / "mu", "fedprox", data, lr=0.05, proximal_mu=0.5)
    grid = FakeGrid(sites)
    prox = drive(strategy, grid, initial_model(), 5)
    assert grid.sent[0].content.config_records["config"]["proximal-mu"] == 0.5
    assert not np.allclose(prox["w"], finals["fedavg"]["w"])


def test_fedbn_keeps_site_local_parameters_local(tmp_path, no_fsync):
    data = make_problem(3, seed=3)
    for i, (a, y) in enumerate(data):  # each site has its own offset: a site-local parameter
        y += 5.0 * (i - 1)
    strategy, sites = _setup(tmp_path, "fedbn", data, local_keys=frozenset({"b"}), use_bias=True, lr=0.05)
    grid = FakeGrid(sites)
    final = drive(strategy, grid, initial_model(), 8)
    assert all("b" not in m.content.array_records["arrays"] for m in grid.sent)
    np.testing.assert_array_equal(final["b"], initial_model()["b"])  # server copy untouched
    local_b = [float(site.local_state["b"][0]) for site in sites.values()]
    assert len(set(np.round(local_b, 6))) == 3
    assert local_b[0] < local_b[1] < local_b[2]  # each site learned its own offset
    assert not np.allclose(final["w"], 0.0)  # shared part was trained and aggregated


def test_fedbn_rejects_unknown_local_names(tmp_path):
    strategy, sites = _setup(tmp_path, "fedbn", make_problem(2), local_keys=frozenset({"nope"}))
    with pytest.raises(ValueError, match="nope"):
        strategy.run(FakeGrid(sites), _record(initial_model()))


def _poisoned_replies(poison: float):
    rng = np.random.default_rng(5)
    honest = [{"w": (1.0 + 0.1 * rng.normal(size=4)).astype(np.float32)} for _ in range(4)]
    bad = {"w": np.full(4, poison, dtype=np.float32)}
    models = honest + [bad]
    replies = [reply_to(i + 1, train_reply(m, 20, f"site-{i + 1}", loss=1.0)) for i, m in enumerate(models)]
    return honest, replies


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregation_resists_one_poisoned_site(tmp_path, name):
    honest, replies = _poisoned_replies(1000.0)
    init = {"w": np.zeros(4, np.float32)}
    grid = FakeGrid({n: (lambda m: None) for n in range(1, 6)})
    strategy = build_strategy(small_settings(strategy=name, min_available_sites=1, cross_site=False, trim_fraction=0.2),
                              RunDirectory(tmp_path / name))
    list(strategy.configure_train(1, _record(init), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    w = arrays["w"].numpy()
    lo = np.min([h["w"] for h in honest], axis=0)
    hi = np.max([h["w"] for h in honest], axis=0)
    assert np.all(w >= lo - 1e-6) and np.all(w <= hi + 1e-6)
    fedavg = weighted_mean([h for h in honest] + [{"w": np.full(4, 1000.0, np.float32)}], [20] * 5)
    assert np.all(fedavg["w"] > 100)  # what plain averaging would have done


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_relative_norm_bound_handles_outlier(tmp_path, action):
    honest, replies = _poisoned_replies(50.0)
    init = {"w": np.zeros(4, np.float32)}
    grid = FakeGrid({n: (lambda m: None) for n in range(1, 6)})
    settings = small_settings(min_available_sites=1, cross_site=False, relative_update_norm=3.0,
                                update_norm_action=action)
    strategy = build_strategy(settings, RunDirectory(tmp_path / action))
    list(strategy.configure_train(1, _record(init), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    line = json.loads(strategy.run_dir.metrics_path.read_text().splitlines()[-1])
    norms = [update_norm(init, h) for h in honest] + [update_norm(init, {"w": np.full(4, 50.0)})]
    bound = 3.0 * float(np.median(norms))
    if action == "reject":
        assert line["excluded"]["site-5"].startswith("rejected: update norm")
        expected = weighted_mean(honest, [20] * 4)
    else:
        assert line["excluded"] == {}
        assert line["clipped"]["site-5"].startswith("clipped: update norm")
        clipped = clip_update(init, {"w": np.full(4, 50.0, np.float32)}, bound)
        assert update_norm(init, clipped) == pytest.approx(bound, rel=1e-5)
        expected = weighted_mean(honest + [clipped], [20] * 5)
    np.testing.assert_allclose(arrays["w"].numpy(), expected["w"], rtol=1e-6)
    assert line["sites"]["site-5"]["update-norm"] == pytest.approx(norms[-1], rel=1e-5)


def test_absolute_norm_bound(tmp_path):
    honest, replies = _poisoned_replies(1.0)  # nobody is an outlier ...
    init = {"w": np.zeros(4, np.float32)}
    grid = FakeGrid({n: (lambda m: None) for n in range(1, 6)})
    settings = small_settings(min_available_sites=1, cross_site=False, max_update_norm=1.0)  # ... but all exceed 1
    strategy = build_strategy(settings, RunDirectory(tmp_path / "abs"))
    list(strategy.configure_train(1, _record(init), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    line = json.loads(strategy.run_dir.metrics_path.read_text().splitlines()[-1])
    assert len(line["excluded"]) == 5


def test_scaffold_accepts_delta_for_trainable_subset_only(tmp_path):
    strategy, sites = _setup(tmp_path, "scaffold", make_problem(2, seed=4), lr=0.05)
    grid = FakeGrid(sites)
    list(strategy.configure_train(1, _record(initial_model()), ConfigRecord(), grid))
    ok = train_reply(initial_model(), 10, "site-1", loss=1.0)
    ok["scaffold-delta-c"] = ArrayRecord({"w": Array(np.full(4, 2.0))})  # parameters only, no buffers
    bad = train_reply(initial_model(), 30, "site-2", loss=1.0)
    bad["scaffold-delta-c"] = ArrayRecord({"w": Array(np.full(4, 2.0)), "extra": Array(np.ones(1))})
    arrays, _ = strategy.aggregate_train(1, [reply_to(1, ok), reply_to(2, bad)])
    assert arrays is not None
    # only site-1 accepted, N = 2 eligible sites: c += (1/2) * 2.0
    np.testing.assert_allclose(strategy.control["w"], np.full(4, 1.0))
    np.testing.assert_array_equal(strategy.control["b"], np.zeros(1))
    line = json.loads(strategy.run_dir.metrics_path.read_text().splitlines()[-1])
    assert "unexpected" in line["excluded"]["site-2"]
