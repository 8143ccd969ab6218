"""FedImagingFedAvg: aggregation, reply screening, metrics.jsonl, checkpoints, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from strategies import RunDirectory, build_strategy
from strategies.aggregation import weighted_mean

from .fakes import small_settings, FakeGrid, eval_reply, refusal, reply_to, train_reply
from .sites import LeastSquaresSite, initial_model, make_problem


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(3, 2, 2)).astype(np.float32),
        "bn.running_mean": rng.normal(size=3).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _strategy(tmp_path, **kw):
    settings = small_settings(**{"min_available_sites": 1, "cross_site": False, **kw})
    return build_strategy(settings, RunDirectory(tmp_path / "run"))


def _configure(strategy, arrays, nodes=(1, 2, 3)):
    grid = FakeGrid({n: (lambda m: None) for n in nodes})
    return list(strategy.configure_train(1, _record(arrays), ConfigRecord(), grid))


def test_weighted_mean_matches_independent_computation_and_keeps_dtypes():
    sets = [_model(i) for i in range(3)]
    for i, s in enumerate(sets):
        s["bn.num_batches_tracked"] = np.array(10 * (i + 1), dtype=np.int64)
    weights = [5, 1, 14]
    out = weighted_mean(sets, weights)
    for key in sets[0]:
        expected = sum(w * s[key].astype(np.float64) for w, s in zip(weights, sets)) / sum(weights)
        assert out[key].dtype == sets[0][key].dtype
        if key == "bn.num_batches_tracked":
            assert out[key] == np.rint(expected)
        else:
            np.testing.assert_allclose(out[key], expected, rtol=1e-6)


def test_aggregate_train_is_case_weighted_and_order_independent(tmp_path):
    init = _model(0)
    updates = {"site-b": (_model(2), 30), "site-a": (_model(1), 10), "site-c": (_model(3), 60)}
    results = []
    for order in (["site-a", "site-b", "site-c"], ["site-c", "site-a", "site-b"]):
        strategy = _strategy(tmp_path / "_".join(order))
        _configure(strategy, init)
        nodes = {"site-a": 1, "site-b": 2, "site-c": 3}
        replies = [reply_to(nodes[s], train_reply(updates[s][0], updates[s][1], s, loss=float(i)))
                   for i, s in enumerate(order)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        results.append({k: v.numpy() for k, v in arrays.items()})
    for key in init:
        assert results[0][key].tobytes() == results[1][key].tobytes(), key
    expected = weighted_mean([updates[s][0] for s in sorted(updates)], [updates[s][1] for s in sorted(updates)])
    for key in init:
        np.testing.assert_array_equal(results[0][key], expected[key])
        manual = sum(n * u[key].astype(np.float64) for u, n in updates.values()) / 100
        np.testing.assert_allclose(results[0][key], manual, rtol=1e-6)


def test_bad_replies_are_excluded_with_reasons_and_round_continues(tmp_path):
    init = _model(0)
    strategy = _strategy(tmp_path)
    _configure(strategy, init, nodes=range(1, 10))
    good_a, good_b = _model(1), _model(2)
    nan = _model(3)
    nan["conv.weight"][0, 0, 0] = np.nan
    shape = _model(4)
    shape["bn.running_mean"] = np.zeros(4, np.float32)
    missing = _model(5)
    del missing["bn.running_mean"]
    extra = {**_model(6), "head.weight": np.ones(2, np.float32)}
    dtype = _model(7)
    dtype["conv.weight"] = dtype["conv.weight"].astype(np.float64)
    no_count = RecordDict({"arrays": _record(_model(8)), "metrics": MetricRecord({"loss": 1.0}),
                           "site": ConfigRecord({"site-name": "h-nocount"})})
    replies = [
        reply_to(1, train_reply(good_a, 10, "a-good", loss=1.0)),
        reply_to(2, train_reply(good_b, 30, "b-good", loss=3.0)),
        reply_to(3, train_reply(nan, 10, "c-nan", loss=1.0)),
        reply_to(4, train_reply(shape, 10, "d-shape", loss=1.0)),
        reply_to(5, train_reply(missing, 10, "e-missing", loss=1.0)),
        reply_to(6, train_reply(extra, 10, "f-extra", loss=1.0)),
        reply_to(7, refusal("g-dp", "privacy budget exhausted: epsilon 8.0 of 8.0 spent")),
        reply_to(8, Error(code=3, reason="CUDA out of memory")),
        reply_to(9, train_reply(dtype, 10, "i-dtype", loss=1.0)),
        reply_to(10, no_count),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = weighted_mean([good_a, good_b], [10, 30])
    for key in init:
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key])
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    line = json.loads(strategy.run_dir.metrics_path.read_text().splitlines()[-1])
    excl = line["excluded"]
    assert set(excl) == {"c-nan", "d-shape", "e-missing", "f-extra", "g-dp", "node-8", "i-dtype", "h-nocount"}
    assert "non-finite" in excl["c-nan"]
    assert "shape" in excl["d-shape"]
    assert "missing" in excl["e-missing"] and "bn.running_mean" in excl["e-missing"]
    assert "unexpected" in excl["f-extra"]
    assert excl["g-dp"].startswith("refused") and "privacy" in excl["g-dp"]
    assert "error" in excl["node-8"] and "CUDA" in excl["node-8"]
    assert "dtype" in excl["i-dtype"]
    assert "num-examples" in excl["h-nocount"]
    assert line["aggregate"] == {"loss": pytest.approx(2.5)}
    assert line["sites"]["a-good"]["num-examples"] == 10
    # the privacy refusal keeps that site out of later training rounds, but not evaluation
    grid = FakeGrid({n: (lambda m: None) for n in range(1, 11)})
    sent = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    assert 7 not in {m.metadata.dst_node_id for m in sent} and len(sent) == 9
    evals = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert 7 in {m.metadata.dst_node_id for m in evals}


def test_all_excluded_keeps_global_model(tmp_path):
    init = _model(0)
    strategy = _strategy(tmp_path)
    _configure(strategy, init, nodes=(1,))
    arrays, _ = strategy.aggregate_train(1, [reply_to(1, Error(code=1, reason="boom"))])
    assert arrays is None
    assert strategy.global_arrays["conv.weight"].tobytes() == init["conv.weight"].tobytes()


def test_train_message_carries_config_and_only_arrays(tmp_path):
    strategy = _strategy(tmp_path, local_epochs=3, lr=0.01)
    msgs = _configure(strategy, _model(0))
    assert len(msgs) == 3
    content = msgs[0].content
    assert set(content.array_records) == {"arrays"}
    cfg = content.config_records["config"]
    assert cfg["server-round"] == 1 and cfg["local-epochs"] == 3 and cfg["lr"] == 0.01
    assert set(cfg) == {"server-round", "local-epochs", "lr"}  # nothing the sites do not read


def test_the_server_decides_each_rounds_learning_rate(tmp_path):
    strategy = _strategy(tmp_path, lr=0.01, lr_schedule="cosine", num_server_rounds=3)
    rates = []
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, _record(_model(0)), ConfigRecord(), FakeGrid(_sites())))
        rates.append(msgs[0].content.config_records["config"]["lr"])
    # cosine from lr to lr / 10: 0.01, 0.01 * (0.1 + 0.9 * 0.5), 0.001
    assert rates == pytest.approx([0.01, 0.0055, 0.001])


def _sites(num=3, seed=0):
    data = make_problem(num, seed=seed)
    return {i + 1: LeastSquaresSite(f"site-{i + 1}", a, y) for i, (a, y) in enumerate(data)}


def test_end_to_end_run_writes_metrics_checkpoints_and_final_model(tmp_path):
    sites = _sites()
    grid = FakeGrid(sites)
    strategy = _strategy(tmp_path, num_server_rounds=4, lr=0.01, local_epochs=1)
    server_calls = []

    def evaluate_fn(rnd, arrays):
        server_calls.append(rnd)
        return MetricRecord({"server-loss": float(rnd)})

    result = strategy.run(grid, _record(initial_model()), evaluate_fn=evaluate_fn)
    run = strategy.run_dir
    lines = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    phases = [(r["round"], r["phase"]) for r in lines]
    assert phases == [(0, "evaluate")] + [(r, p) for r in range(1, 5) for p in ("train", "evaluate")]
    assert server_calls == [0, 1, 2, 3, 4]
    for line in lines[1:]:
        assert set(line) >= {"round", "phase", "seconds", "sites", "aggregate", "excluded"}
        assert set(line["sites"]) == {"site-1", "site-2", "site-3"}
        assert "num-examples" not in line["aggregate"]
        assert all("num-examples" in m for m in line["sites"].values())
        assert line["excluded"] == {}
    ev = [r for r in lines if r["phase"] == "evaluate" and r["round"] > 0]
    for line in ev:  # aggregate = independent case-weighted mean of the site values
        sites_m = line["sites"]
        n = sum(m["num-examples"] for m in sites_m.values())
        expected = sum(m["num-examples"] * m["dice"] for m in sites_m.values()) / n
        assert line["aggregate"]["dice"] == pytest.approx(expected)
        assert line["server"] == {"server-loss": float(line["round"])}
    best_round = max(ev, key=lambda r: r["aggregate"]["dice"])["round"]
    final = torch.load(run.final_model_path, weights_only=True)
    last = torch.load(run.checkpoints_dir / "last.pt", weights_only=True)
    best = torch.load(run.checkpoints_dir / "best.pt", weights_only=True)
    assert set(final) == {"w", "b", "steps"} and final["steps"].dtype == torch.int64
    assert final["steps"].shape == () and int(final["steps"]) == 4 * 20
    for key in final:
        np.testing.assert_array_equal(final[key].numpy(), result.arrays[key].numpy())
        np.testing.assert_array_equal(last[key].numpy(), final[key].numpy())
    assert strategy.best["round"] == best_round
    state = json.loads((run.server_state_dir / "latest.json").read_text())
    assert state["round"] == 4
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]
    assert best["w"].shape == final["w"].shape


def test_sampling_is_deterministic_given_seed(tmp_path):
    picks = []
    for i in range(2):
        strategy = _strategy(tmp_path / str(i), fraction_train=0.5, seed=7)
        grid = FakeGrid({n: (lambda m: None) for n in range(10)})
        rounds = []
        for rnd in range(1, 4):
            msgs = strategy.configure_train(rnd, _record(_model(0)), ConfigRecord(), grid)
            rounds.append(sorted(m.metadata.dst_node_id for m in msgs))
        picks.append(rounds)
    assert picks[0] == picks[1]
    assert all(len(r) == 5 for r in picks[0])
    assert len({tuple(r) for r in picks[0]}) > 1  # not the same sample every round


def test_fresh_run_refuses_a_used_run_directory(tmp_path):
    sites = _sites()
    s1 = _strategy(tmp_path, num_server_rounds=1, lr=0.01)
    s1.run(FakeGrid(sites), _record(initial_model()))
    s2 = _strategy(tmp_path, num_server_rounds=1, lr=0.01)
    with pytest.raises(ValueError, match="already holds a run"):
        s2.run(FakeGrid(sites), _record(initial_model()))


def test_evaluate_replies_screened(tmp_path):
    strategy = _strategy(tmp_path)
    grid = FakeGrid({n: (lambda m: None) for n in (1, 2, 3)})
    strategy.global_arrays = _model(0)
    list(strategy.configure_evaluate(1, _record(_model(0)), ConfigRecord(), grid))
    replies = [
        reply_to(1, eval_reply(10, "a", dice=0.5, hd95=float("inf")), "evaluate"),
        reply_to(2, eval_reply(30, "b", dice=0.9, hd95=4.0), "evaluate"),
        reply_to(3, Error(code=2, reason="disk full"), "evaluate"),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["dice"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert metrics["hd95"] == pytest.approx(4.0)  # non-finite values skipped, not poisoning the mean
    pending = strategy.pending_evaluate
    assert pending["sites"]["a"]["hd95"] is None
    assert "node-3" in pending["excluded"]


def test_settings_validation():
    with pytest.raises(ValueError, match="'strategy' must be one of"):
        small_settings(strategy="fedfoo")
    with pytest.raises(ValueError, match="trim-fraction"):
        small_settings(trim_fraction=0.5)
    assert small_settings(strategy="fedadam").effective_server_lr == pytest.approx(1e-2)
    assert small_settings(strategy="fedavg").effective_server_lr == 1.0
    assert not small_settings(best_metric="loss").higher_is_better


def test_server_app_maps_every_run_config_setting():
    from app.config import parse_run_config, strategy_settings

    run = parse_run_config({"strategy": "fedprox", "num-server-rounds": 5, "proximal-mu": 0.1,
                            "fraction-train": 0.5, "local-baselines": "true", "trim-fraction": 0.1})
    s = strategy_settings(run, "dice", min_sites=3)
    assert (s.strategy, s.num_server_rounds, s.proximal_mu, s.fraction_train, s.local_baselines, s.trim_fraction) == (
        "fedprox", 5, 0.1, 0.5, True, 0.1)
    assert s.min_available_sites == 3 and s.best_metric == "dice"


def test_run_directory_rejects_relative_path():
    with pytest.raises(ValueError, match="absolute"):
        RunDirectory("runs/x")


def test_missing_reply_is_recorded(tmp_path):
    strategy = _strategy(tmp_path)
    _configure(strategy, _model(0), nodes=(1, 2))
    arrays, _ = strategy.aggregate_train(1, [reply_to(1, train_reply(_model(1), 5, "a", loss=1.0))])
    np.testing.assert_array_equal(arrays["conv.weight"].numpy(), _model(1)["conv.weight"])
    line = json.loads(strategy.run_dir.metrics_path.read_text().splitlines()[-1])
    assert line["excluded"] == {"node-2": "no reply before the round timeout"}


def _failing_site(name):
    def answer(msg):
        if msg.metadata.message_type == "evaluate":
            return eval_reply(4, name, dice=0.2)
        return refusal(name, "site-failure dataset-invalid: the site's dataset failed validation")
    return answer


def test_a_run_in_which_no_site_trained_ends_as_failed(tmp_path, caplog):
    from strategies import NoSiteTrained

    strategy = _strategy(tmp_path, num_server_rounds=2, cross_site=True)
    sites = {1: _failing_site("a"), 2: _failing_site("b")}
    with pytest.raises(NoSiteTrained, match="no site trained.*dataset-invalid"):
        strategy.run(FakeGrid(sites), _record(_model(0)))
    run = tmp_path / "run"
    assert not (run / "final_model.pt").exists()
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "checkpoints" / "last.pt").exists()
    assert not (run / "cross_site.json").exists()
    assert json.loads((run / "failed.json").read_text())["status"] == "failed"
    assert "New best" not in caplog.text  # the untrained model's dice is never "best"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["phase"]) for r in lines] == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]


def test_checkpoints_start_with_the_first_round_a_site_trained(tmp_path):
    trained = _sites()

    def late(msg):  # refuses in round 1, trains from round 2
        if msg.metadata.message_type == "train" and msg.content.config_records["config"]["server-round"] == 1:
            return refusal("site-1", "busy")
        return trained[1](msg)

    strategy = _strategy(tmp_path, num_server_rounds=2)
    strategy.run(FakeGrid({1: late}), _record(initial_model()))
    assert strategy.best["round"] == 2
    assert (tmp_path / "run" / "final_model.pt").exists()
