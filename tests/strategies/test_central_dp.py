"""Central DP: Flower's fixed-clipping wrappers around our FedAvg, checked against numpy.

Each site sends a known update; the expected aggregate (clipped updates, uniform mean with the
fixed denominator) is computed here independently, and what is left over must be Gaussian noise
with standard deviation z * C / n. Epsilon is checked against the closed-form RDP of the
Gaussian mechanism.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from opacus.accountants import RDPAccountant

from app.config import ConfigError, parse_run_config
from strategies import RunDirectory, build_strategy
from app.site_mods import site_clipping_mod
from strategies.run_dir import load_server_state

from .fakes import small_settings, FakeGrid, Interrupted, refusal, train_reply

P = 40_000  # parameters: enough samples to measure the noise's standard deviation
NORMS = {"site-a": 0.5, "site-b": 3.0, "site-c": 12.0}


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _init():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=P).astype(np.float64), "b": np.zeros(3)}


def _delta(site: str) -> dict[str, np.ndarray]:
    """A fixed update of L2 norm NORMS[site] (the same in every round)."""
    rng = np.random.default_rng(sum(map(ord, site)))
    d = {"w": rng.normal(size=P), "b": rng.normal(size=3)}
    norm = math.sqrt(sum(float(np.sum(v**2)) for v in d.values()))
    return {k: v * NORMS[site] / norm for k, v in d.items()}


def _site(name: str, sizes: dict[str, int] | None = None):
    def answer(msg: Message):
        received = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        if msg.metadata.message_type == "evaluate":
            return RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice": 0.5}),
                               "site": ConfigRecord({"site-name": name})})
        new = {k: received[k] + v for k, v in _delta(name).items()}
        return train_reply(new, (sizes or {}).get(name, 10), name, loss=1.0)
    return answer


def _clipped(d, c):
    norm = math.sqrt(sum(float(np.sum(v**2)) for v in d.values()))
    return {k: v * min(1.0, c / norm) for k, v in d.items()}


def _settings(**kw):
    base = dict(strategy="fedavg", num_server_rounds=1, min_available_sites=3, cross_site=False, central_dp="server-side",
                central_dp_noise_multiplier=0.8, central_dp_clipping_norm=1.0)
    return small_settings(**{**base, **kw})


def _sites(wrap=None):
    sites = {i + 1: _site(s, {"site-a": 100, "site-b": 10, "site-c": 1}) for i, s in enumerate(NORMS)}
    return {n: (wrap(f) if wrap else f) for n, f in sites.items()}


def _expected(init, c, n, sites=tuple(NORMS)):
    total = {k: sum(_clipped(_delta(s), c)[k] for s in sites) for k in init}
    return {k: init[k] + total[k] / n for k in init}


def _epsilon_closed_form(z: float, releases: int, delta: float) -> float:
    """RDP of the Gaussian mechanism, k * alpha / (2 z^2), converted as Opacus does (Balle et al.)."""
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = releases * orders / (2 * z**2)
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


def _train_lines(run_dir):
    return [r for r in run_dir.read_metrics() if r["phase"] == "train"]


def test_server_side_clips_averages_uniformly_and_adds_calibrated_noise(tmp_path):
    init = _init()
    run_dir = RunDirectory(tmp_path / "run")
    strategy = build_strategy(_settings(), run_dir)
    result = strategy.run(FakeGrid(_sites()), _record(init))
    out = {k: v.numpy() for k, v in result.arrays.items()}
    # case counts 100/10/1 are ignored: uniform, fixed-denominator mean of clipped updates
    expected = _expected(init, c=1.0, n=3)
    residual = np.concatenate([(out[k] - expected[k]).ravel() for k in init])
    assert residual.std() == pytest.approx(0.8 * 1.0 / 3, rel=0.03)
    assert abs(residual.mean()) < 4 * 0.8 / 3 / math.sqrt(residual.size)
    line = _train_lines(run_dir)[0]
    cdp = line["central-dp"]
    assert cdp["mode"] == "server-side" and cdp["releases"] == 1 and cdp["sites-denominator"] == 3
    assert cdp["noise-std"] == pytest.approx(0.8 / 3)
    assert cdp["epsilon"] == pytest.approx(_epsilon_closed_form(0.8, 1, 1e-5), rel=1e-9)


def test_client_side_clipping_happens_at_the_site(tmp_path):
    seen: list[tuple[str, float]] = []

    def with_mod(site):
        def answer(msg):
            ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={}, state=RecordDict(), run_config={})
            sent = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}

            def call_next(m, c):
                return Message(site(m), reply_to=m)

            reply = site_clipping_mod(msg, ctx, call_next)
            if msg.metadata.message_type != "train":
                return reply.content
            back = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            norm = math.sqrt(sum(float(np.sum((back[k] - sent[k]) ** 2)) for k in sent))
            seen.append((reply.content.config_records["site"]["site-name"], norm))
            return reply.content
        return answer

    init = _init()
    run_dir = RunDirectory(tmp_path / "run")
    result = build_strategy(_settings(central_dp="client-side", central_dp_clipping_norm=2.0), run_dir).run(
        FakeGrid(_sites(with_mod)), _record(init))
    # what left each site is already clipped to C = 2 (site-a's 0.5 stays as it was)
    assert dict(seen) == pytest.approx({"site-a": 0.5, "site-b": 2.0, "site-c": 2.0}, rel=1e-9)
    out = {k: v.numpy() for k, v in result.arrays.items()}
    expected = _expected(init, c=2.0, n=3)
    residual = np.concatenate([(out[k] - expected[k]).ravel() for k in init])
    assert residual.std() == pytest.approx(0.8 * 2.0 / 3, rel=0.03)
    assert _train_lines(run_dir)[0]["central-dp"]["mode"] == "client-side"


def test_site_mod_passes_other_messages_and_refusals_through():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    arrays = {"w": np.ones(4)}
    plain = Message(content=RecordDict({"arrays": _record(arrays), "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=1, message_type="train")
    moved = train_reply({"w": np.full(4, 50.0)}, 3, "site-a")
    out = site_clipping_mod(plain, ctx, lambda m, c: Message(moved, reply_to=m))
    np.testing.assert_array_equal(out.content["arrays"]["w"].numpy(), np.full(4, 50.0))  # no key: untouched
    asked = Message(content=RecordDict({"arrays": _record(arrays),
                                        "config": ConfigRecord({"server-round": 1, "clipping_norm": 1.0})}),
                    dst_node_id=1, message_type="train")
    out = site_clipping_mod(asked, ctx, lambda m, c: Message(refusal("site-a", "privacy budget exhausted"), reply_to=m))
    assert not out.has_error()
    assert out.content.config_records["site"]["refused-reason"] == "privacy budget exhausted"
    out = site_clipping_mod(asked, ctx, lambda m, c: Message(moved, reply_to=m))
    np.testing.assert_allclose(out.content["arrays"]["w"].numpy(), np.ones(4) + 0.5)  # 49*4 -> norm 1


def test_bad_replies_are_set_aside_and_excluded_and_the_denominator_stays(tmp_path):
    init = _init()
    sites = _sites()
    sites[2] = lambda msg: train_reply({"w": np.zeros(7), "b": np.zeros(3)}, 10, "site-b")  # wrong shape
    sites[3] = lambda msg: Error(code=0, reason="site crashed")
    run_dir = RunDirectory(tmp_path / "run")
    result = build_strategy(_settings(central_dp_noise_multiplier=1e-9), run_dir).run(FakeGrid(sites), _record(init))
    line = _train_lines(run_dir)[0]
    assert set(line["excluded"]) == {"site-b", "node-3"}  # site-c never named itself: it only sent an error
    assert "site crashed" in line["excluded"]["node-3"]
    assert "shape" in line["excluded"]["site-b"]
    out = {k: v.numpy() for k, v in result.arrays.items()}
    expected = _expected(init, c=1.0, n=3, sites=("site-a",))  # one site / fixed n = 3
    for k in init:
        np.testing.assert_allclose(out[k], expected[k], atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "scaffold", "fedbn", "fedmedian", "fedtrimmedavg"])
def test_strategies_that_are_not_a_plain_mean_refuse_central_dp(name):
    with pytest.raises(ValueError, match="central-dp"):
        _settings(strategy=name)
    with pytest.raises(ConfigError, match="central-dp"):
        parse_run_config({"strategy": name, "central-dp": "server-side"})


def test_bad_central_dp_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="central-dp-noise-multiplier"):
        parse_run_config({"central-dp": "client-side", "central-dp-noise-multiplier": 0})
    with pytest.raises(ValueError, match="server-lr"):
        _settings(server_lr=0.5)
    run_dir = RunDirectory(tmp_path / "run")
    with pytest.raises(ValueError, match="non-float"):
        build_strategy(_settings(), run_dir).run(
            FakeGrid(_sites()), _record({**_init(), "steps": np.array(3, dtype=np.int64)}))
    assert run_dir.load_server_state() is None


def test_resume_repeats_the_noise_and_fresh_runs_do_not(tmp_path):
    init = _init()
    settings = _settings(num_server_rounds=3)
    full = build_strategy(settings, RunDirectory(tmp_path / "full")).run(FakeGrid(_sites()), _record(init))
    other = build_strategy(settings, RunDirectory(tmp_path / "other")).run(FakeGrid(_sites()), _record(init))
    assert full.arrays["w"].numpy().tobytes() != other.arrays["w"].numpy().tobytes()  # secret, not the seed

    run_dir = RunDirectory(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        build_strategy(settings, run_dir).run(FakeGrid(_sites(), interrupt_at_round=3), _record(init))
    # the first run's secret is in its own server state: copy the interrupted run and resume it
    resumed = build_strategy(dataclasses.replace(settings, resume_from=str(run_dir.root)),
                             run_dir).run(FakeGrid(_sites()), _record(init))
    state = json.loads((run_dir.server_state_dir / "latest.json").read_text())
    assert state["round"] == 3
    lines = _train_lines(run_dir)
    assert [line["central-dp"]["releases"] for line in lines] == [1, 2, 3]
    assert lines[-1]["central-dp"]["epsilon"] == pytest.approx(_epsilon_closed_form(0.8, 3, 1e-5), rel=1e-9)
    # an uninterrupted run with the same secret gives the same bytes: replay it from round 0
    replay_dir = RunDirectory(tmp_path / "replay")
    replay = build_strategy(settings, replay_dir)
    replay.extensions[0].secret = load_server_state(run_dir.root)[2]["central-dp"]["secret"]
    again = replay.run(FakeGrid(_sites()), _record(init))
    assert again.arrays["w"].numpy().tobytes() == resumed.arrays["w"].numpy().tobytes()


def test_server_side_clips_a_reply_whose_arrays_come_in_another_order(tmp_path):
    init = _init()
    sites = _sites()
    honest = sites[3]

    def reordered(msg):
        content = honest(msg)
        if msg.metadata.message_type != "train":
            return content
        arrays = content["arrays"]
        content["arrays"] = ArrayRecord({k: arrays[k] for k in reversed(list(arrays.keys()))})
        return content

    sites[3] = reordered
    run_dir = RunDirectory(tmp_path / "run")
    result = build_strategy(_settings(central_dp_noise_multiplier=1e-9), run_dir).run(FakeGrid(sites), _record(init))
    assert _train_lines(run_dir)[0]["excluded"] == {}
    out = {k: v.numpy() for k, v in result.arrays.items()}
    expected = _expected(init, c=1.0, n=3)  # site-c's norm-12 update was clipped like the others
    for k in init:
        np.testing.assert_allclose(out[k], expected[k], atol=1e-6)


def test_client_side_excludes_a_site_that_did_not_clip(tmp_path):
    init = _init()
    run_dir = RunDirectory(tmp_path / "run")
    # no site runs the clipping mod: only site-a's update (norm 0.5) is within C = 1
    result = build_strategy(_settings(central_dp="client-side", central_dp_noise_multiplier=1e-9), run_dir).run(
        FakeGrid(_sites()), _record(init))
    excluded = _train_lines(run_dir)[0]["excluded"]
    assert set(excluded) == {"site-b", "site-c"}
    assert all("did not clip" in reason for reason in excluded.values())
    out = {k: v.numpy() for k, v in result.arrays.items()}
    expected = _expected(init, c=1.0, n=3, sites=("site-a",))
    for k in init:
        np.testing.assert_allclose(out[k], expected[k], atol=1e-6)
