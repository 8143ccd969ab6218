"""Interrupt a run after round k, resume it, and get bit-for-bit the uninterrupted result."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from strategies import RunDirectory, build_strategy

from .fakes import small_settings, FakeGrid, Interrupted, refusal
from .sites import LeastSquaresSite, initial_model, make_problem


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _sites(refusing: bool = False):
    data = make_problem(4, seed=11)
    sites = {10 + i: LeastSquaresSite(f"site-{i}", a, y, local_steps=10) for i, (a, y) in enumerate(data)}
    if refusing:  # site-2's privacy budget runs out after round 1: it must stay unsampled after a resume
        real = sites[12]

        def site(msg):
            cfg = msg.content.config_records["config"]
            if msg.metadata.message_type == "train" and cfg["server-round"] >= 2:
                return refusal("site-2", "privacy budget exhausted")
            return real(msg)

        sites[12] = site
    return sites


def _settings(name, **kw):
    return small_settings(strategy=name, num_server_rounds=6, fraction_train=0.5, min_available_sites=1, lr=0.03,
                            server_lr=0.1 if name in ("fedadam", "fedyogi") else 0.0, cross_site=False, **kw)


def _strip_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.mark.parametrize("name, phase, refusing", [("scaffold", "train", False), ("fedadam", "evaluate", False),
                                                   ("fedavg", "train", True)])
def test_resume_gives_the_uninterrupted_result(tmp_path, name, phase, refusing):
    full_dir = RunDirectory(tmp_path / "full")
    full_strategy = build_strategy(_settings(name), full_dir)
    full = full_strategy.run(FakeGrid(_sites(refusing)), _record(initial_model()))

    run_dir = RunDirectory(tmp_path / "resumed")
    sites = _sites(refusing)  # the sites (and their state) survive the server crash
    with pytest.raises(Interrupted):
        build_strategy(_settings(name), run_dir).run(
            FakeGrid(sites, interrupt_at_round=4, interrupt_phase=phase), _record(initial_model()))
    assert json.loads((run_dir.server_state_dir / "latest.json").read_text())["round"] == 3
    resumed_strategy = build_strategy(_settings(name, resume_from=str(run_dir.root)), run_dir)
    resumed = resumed_strategy.run(FakeGrid(sites), _record(initial_model()))

    for key in full.arrays:
        assert full.arrays[key].numpy().tobytes() == resumed.arrays[key].numpy().tobytes(), key
    final_full = torch.load(full_dir.final_model_path, weights_only=True)
    final_resumed = torch.load(run_dir.final_model_path, weights_only=True)
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key])
    lines_full = full_dir.read_metrics()
    lines_resumed = run_dir.read_metrics()
    expected_phases = [(r, p) for r in range(1, 7) for p in ("train", "evaluate")]
    assert [(r["round"], r["phase"]) for r in lines_resumed] == expected_phases
    assert _strip_seconds(lines_full) == _strip_seconds(lines_resumed)
    assert sorted(resumed.train_metrics_clientapp) == list(range(1, 7))
    if refusing:
        refused_rounds = [r["round"] for r in lines_resumed if "site-2" in r.get("excluded", {})]
        assert refused_rounds[0] < 4, refused_rounds  # refused before the crash: persisted exclusion matters
        assert len(refused_rounds) == 1 and resumed_strategy.excluded_from_sampling == {
            "site-2": "privacy budget exhausted"}
    assert resumed_strategy.best == full_strategy.best
    best_full = torch.load(full_dir.checkpoints_dir / "best.pt", weights_only=True)
    best_resumed = torch.load(run_dir.checkpoints_dir / "best.pt", weights_only=True)
    assert all(torch.equal(best_full[k], best_resumed[k]) for k in best_full)


def test_resume_rejects_other_strategy_and_missing_state(tmp_path):
    run_dir = RunDirectory(tmp_path / "a")
    build_strategy(_settings("fedavg", ), run_dir).run(FakeGrid(_sites()), _record(initial_model()), num_rounds=2)
    with pytest.raises(ValueError, match="fedavg"):
        build_strategy(_settings("scaffold", resume_from=str(run_dir.root)), RunDirectory(tmp_path / "b")).run(
            FakeGrid(_sites()), _record(initial_model()))
    with pytest.raises(FileNotFoundError, match="server_state"):
        build_strategy(_settings("fedavg", resume_from=str(tmp_path / "nothing")), RunDirectory(tmp_path / "c")).run(
            FakeGrid(_sites()), _record(initial_model()))


def test_server_state_is_weights_only_and_json(tmp_path):
    run_dir = RunDirectory(tmp_path / "a")
    build_strategy(_settings("fedadam"), run_dir).run(FakeGrid(_sites()), _record(initial_model()), num_rounds=2)
    folder = run_dir.server_state_dir / json.loads((run_dir.server_state_dir / "latest.json").read_text())["folder"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["best-checkpoint.pt", "global.pt", "opt-m.pt", "opt-v.pt", "state.json"]
    assert (run_dir.server_state_dir / "initial.pt").exists()
    for pt in folder.glob("*.pt"):
        state = torch.load(pt, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    state = json.loads((folder / "state.json").read_text())
    assert state["round"] == 2 and state["strategy"] == "fedadam"
    assert len(list(run_dir.server_state_dir.glob("round-*"))) == 1  # older rounds cleaned up


def test_resume_restores_best_checkpoint_of_the_saved_state(tmp_path, monkeypatch):
    run_dir = RunDirectory(tmp_path / "run")
    original = RunDirectory.save_server_state

    def crash_at_4(self, server_round, arrays, state):
        if server_round == 4:  # best.pt/last.pt of round 4 are written, its state is not
            raise Interrupted("crash while saving round 4")
        return original(self, server_round, arrays, state)

    monkeypatch.setattr(RunDirectory, "save_server_state", crash_at_4)
    settings = small_settings(num_server_rounds=6, min_available_sites=1, lr=0.002, cross_site=False, best_metric="loss")
    strategy = build_strategy(settings, run_dir)
    with pytest.raises(Interrupted):
        strategy.run(FakeGrid(_sites()), _record(initial_model()))
    assert strategy.best["round"] == 4  # the case-weighted loss falls every round here
    monkeypatch.setattr(RunDirectory, "save_server_state", original)
    best_4 = torch.load(run_dir.checkpoints_dir / "best.pt", weights_only=True)

    resumed = build_strategy(settings, run_dir)
    assert resumed.restore_server_state(run_dir.root) == 3
    assert resumed.best["round"] == 3
    best_3 = torch.load(run_dir.checkpoints_dir / "best.pt", weights_only=True)
    assert not torch.equal(best_3["w"], best_4["w"])
    np.testing.assert_array_equal(best_3["w"].numpy(), resumed.global_arrays["w"])
