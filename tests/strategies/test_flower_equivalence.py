"""Our strategies give Flower's built-in results on the same (valid) replies, over several rounds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg, FedYogi

from strategies import RunDirectory, build_strategy

from .fakes import small_settings, FakeGrid, copy_content, reply_to, train_reply

SITES = {1: ("alpha", 12), 2: ("beta", 40), 3: ("gamma", 7), 4: ("delta", 25), 5: ("eps", 16)}


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _site_models(current, rnd):
    rng = np.random.default_rng(100 + rnd)
    out = {}
    for node in SITES:
        out[node] = {k: (v + rng.normal(scale=0.1 * node, size=v.shape)).astype(v.dtype) for k, v in current.items()}
    return out


def _replies(models):
    return [reply_to(node, train_reply(models[node], SITES[node][1], SITES[node][0], loss=0.1 * node))
            for node in sorted(models, reverse=True)]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(strategy="fedavg"), lambda: FedAvg(min_available_nodes=1)),
        (dict(strategy="fedadam", server_lr=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
         lambda: FedAdam(min_available_nodes=1, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        (dict(strategy="fedyogi", server_lr=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
         lambda: FedYogi(min_available_nodes=1, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        (dict(strategy="fedmedian"), lambda: FedMedian(min_available_nodes=1)),
        (dict(strategy="fedtrimmedavg", trim_fraction=0.2), lambda: FedTrimmedAvg(min_available_nodes=1, beta=0.2)),
    ],
    ids=["fedavg", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"],
)
def test_matches_flower_builtin_over_rounds(tmp_path, ours, theirs):
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    settings = small_settings(min_available_sites=1, cross_site=False, **ours)
    mine = build_strategy(settings, RunDirectory(tmp_path / "run"))
    flower = theirs()
    grid = FakeGrid({n: (lambda m: None) for n in SITES})
    cur_mine, cur_flower = _record(init), _record(init)
    for rnd in (1, 2, 3):
        list(mine.configure_train(rnd, cur_mine, ConfigRecord(), grid))
        list(flower.configure_train(rnd, cur_flower, ConfigRecord(), grid))
        models = _site_models({k: v.numpy() for k, v in cur_mine.items()}, rnd)
        replies = _replies(models)
        arrays_m, metrics_m = mine.aggregate_train(rnd, replies)
        arrays_f, metrics_f = flower.aggregate_train(rnd, [reply_to(r.metadata.src_node_id, copy_content(r.content))
                                                           for r in replies])
        for key in init:
            assert arrays_m[key].numpy().dtype == init[key].dtype
            np.testing.assert_allclose(arrays_m[key].numpy(), arrays_f[key].numpy(), rtol=2e-5, atol=2e-6)
        assert metrics_m["loss"] == pytest.approx(metrics_f["loss"])
        # continue both from the same point so float32 rounding does not accumulate
        cur_mine = arrays_m
        cur_flower = _record({k: v.numpy() for k, v in arrays_m.items()})
