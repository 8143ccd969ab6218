"""Run config ``freeze`` at the server: frozen arrays are sent, never expected back, never changed."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies import RunDirectory, build_strategy

from .fakes import FakeGrid, arrays_of, reply_to, small_settings, train_reply

FROZEN = frozenset({"encoder.weight", "encoder.bias"})


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "encoder.bias": rng.normal(size=4).astype(np.float32),
        "norm.weight": rng.normal(size=4).astype(np.float32),
        "head.weight": rng.normal(size=(2, 4)).astype(np.float32),
    }


def _strategy(tmp_path, strategy="fedavg", **kw):
    settings = small_settings(min_available_sites=1, cross_site=False, strategy=strategy, **kw)
    return build_strategy(settings, RunDirectory(tmp_path / "run"), frozenset({"norm.weight"}), FROZEN)


def _round(strategy, init, updates, extra=None):
    """One train round: every site returns its update (without the frozen arrays unless ``extra``)."""
    grid = FakeGrid({n: (lambda m: None) for n in range(1, len(updates) + 1)})
    record = ArrayRecord({k: Array(v) for k, v in init.items()})
    sent = list(strategy.configure_train(1, record, ConfigRecord(), grid))
    replies = []
    for node, (site, (arrays, cases)) in enumerate(sorted(updates.items()), start=1):
        content = train_reply({k: v for k, v in arrays.items() if k in (extra or {}).get(site, set(arrays))},
                              cases, site)
        if strategy.settings.strategy == "scaffold":
            content["scaffold-delta-c"] = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in arrays.items()})
        replies.append(reply_to(node, content))
    out, _ = strategy.aggregate_train(1, replies)
    return sent, {k: v.numpy() for k, v in out.items()} if out is not None else None


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "scaffold"])
def test_frozen_arrays_are_sent_not_expected_back_and_kept(tmp_path, name):
    init = _model(0)
    trained = {"site-a": _model(1), "site-b": _model(2)}
    shared = set(init) - ({"norm.weight"} if name == "fedbn" else set())  # FedBN keeps norm.weight local
    returned = {s: {k: v for k, v in a.items() if k in shared - FROZEN} for s, a in trained.items()}
    kw = {"optimizer": "sgd"} if name == "scaffold" else {}
    strategy = _strategy(tmp_path, name, **kw)
    sent, out = _round(strategy, init, {s: (a, 10 * (i + 1)) for i, (s, a) in enumerate(sorted(returned.items()))})
    assert set(arrays_of(sent[0])) == shared  # the sites get the frozen arrays to train with
    assert set(strategy.sent_arrays) == shared - FROZEN  # ... and are not asked to return them
    assert out is not None and set(out) == set(init)
    for key in FROZEN:
        assert out[key].tobytes() == init[key].tobytes(), key  # the server keeps what it sent
    mean = (10 * trained["site-a"]["head.weight"].astype(np.float64)
            + 20 * trained["site-b"]["head.weight"].astype(np.float64)) / 30
    np.testing.assert_allclose(out["head.weight"], mean, rtol=1e-6)


def test_a_reply_that_carries_a_frozen_array_is_excluded(tmp_path):
    init = _model(0)
    strategy = _strategy(tmp_path)
    everything = set(init)
    good = {k for k in init if k not in FROZEN}
    _round(strategy, init, {"site-a": (_model(1), 10), "site-b": (_model(2), 10)},
           extra={"site-a": everything, "site-b": good})
    line = strategy.run_dir.read_metrics()[-1]
    assert "unexpected keys" in line["excluded"]["site-a"] and "encoder" in line["excluded"]["site-a"]
    assert "site-b" not in line["excluded"]
