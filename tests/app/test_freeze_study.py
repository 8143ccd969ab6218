"""Run config ``freeze`` through the real ServerApp and ClientApp (in-process grid, tiny volumes):
frozen tensors never travel back, stay bit-identical at the sites (also under DP-SGD, where Opacus
sees only the rest) and in the global model; a bad pattern stops the study before round 1.

The studies share the suite's demo federation (``demo_root``, tests/conftest.py); each keeps its
own home, run directory and site state."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord

from app.client_app import app as client_app
from app.config import parse_run_config
from app.config_values import ConfigError
from app.server_app import run_study
from tests.app.grids import CapturingGrid
from fedimaging.weights import load_tensors
from strategies import load_weights
from tasks import get_task

TINY = {
    "num-server-rounds": 1, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16",
    "channels": "4,8,16", "crops-per-case": 1, "batch-size": 2, "demo-sites": 2, "torch-threads": 1,
    "freeze": "encoder",
}


def _study(home, demo_root, **extra):
    raw = {**TINY, "home": str(home), "run-dir": str(home / "run"), "demo-root": str(demo_root), **extra}
    grid = CapturingGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], raw)
    run_dir = run_study(grid, raw, run_id=21)
    run = parse_run_config(raw)
    task = get_task(run.task, run.task_settings())
    model = task.build_model()
    return grid.replies, run_dir, model, task.frozen_names(model)


def _train_arrays(replies):
    return [r.content["arrays"] for r in replies
            if isinstance(r.content.get("arrays"), ArrayRecord) and "train-steps" in r.content.get("metrics", {})]


def _check_global(run_dir, model, frozen):
    initial, final = load_weights(run_dir / "server_state" / "initial.pt"), load_weights(run_dir / "final_model.pt")
    assert set(final) == set(model.state_dict())
    for name in frozen:
        assert final[name].tobytes() == initial[name].tobytes(), name
    changed = [n for n in final if n not in frozen and final[n].tobytes() != initial[n].tobytes()]
    assert len(changed) > len(set(final) - frozen) // 2  # the rest trained


@pytest.mark.slow
def test_frozen_tensors_stay_fixed_and_never_travel_back(tmp_path, demo_root):
    replies, run_dir, model, frozen = _study(tmp_path, demo_root, **{"local-baselines": True, "personalization": "finetune"})
    names = set(model.state_dict())
    assert frozen and frozen < names
    trained = _train_arrays(replies)
    assert len(trained) == 4  # two sites' round-1 updates and their two local-only baselines
    for record in trained:
        assert set(record.keys()) == names - frozen
    _check_global(run_dir, model, frozen)
    initial = load_weights(run_dir / "server_state" / "initial.pt")
    personal = sorted(tmp_path.rglob("personal-round-*.pt"))
    assert len(personal) == 2  # the personal models were fine-tuned with the encoder fixed as well
    for path in personal:
        state = load_tensors(path)
        assert all(state[n].numpy().tobytes() == initial[n].tobytes() for n in frozen)


@pytest.mark.slow
def test_a_dp_site_trains_and_noises_only_what_is_not_frozen(tmp_path, demo_root):
    from app.site_runtime import _DP_SESSIONS

    before = set(_DP_SESSIONS)
    replies, run_dir, model, frozen = _study(tmp_path, demo_root, **{"dp-epsilon": 8.0, "cross-site": False})
    sessions = [s for k, s in _DP_SESSIONS.items() if k not in before and str(tmp_path) in k[2]]
    assert len(sessions) == 2
    trainable = [p for n, p in model.named_parameters() if n not in frozen]
    initial = load_weights(run_dir / "server_state" / "initial.pt")
    for session in sessions:
        params = [p for group in session.optimizer.original_optimizer.param_groups for p in group["params"]]
        assert [tuple(p.shape) for p in params] == [tuple(p.shape) for p in trainable]  # Opacus: the rest only
        state = session.module.state_dict()
        assert all(state[n].cpu().numpy().tobytes() == initial[n].tobytes() for n in frozen)
    trained = _train_arrays(replies)
    assert len(trained) == 2 and all(set(r.keys()) == set(model.state_dict()) - frozen for r in trained)
    assert all("dp-epsilon-spent" in r.content["metrics"] for r in replies if "train-steps" in r.content["metrics"])
    _check_global(run_dir, model, frozen)


def test_a_pattern_matching_nothing_stops_the_study_before_round_one(tmp_path):
    raw = {**TINY, "home": str(tmp_path), "run-dir": str(tmp_path / "run"), "freeze": "encoder,model.7.*"}
    grid = CapturingGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], raw)
    with pytest.raises(ConfigError, match=r"'freeze'.*'model\.7\.\*'"):
        run_study(grid, raw, run_id=22)
    assert grid.replies == []  # no site was asked anything


def test_freeze_is_refused_with_central_dp():
    with pytest.raises(ConfigError, match="'freeze'"):
        parse_run_config({"freeze": "encoder", "central-dp": "server-side"})
    assert parse_run_config({"freeze": " encoder , model.2.* ,"}).freeze == ("encoder", "model.2.*")


@pytest.mark.slow
def test_secure_aggregation_encrypts_only_what_is_not_frozen(tmp_path, demo_root):
    import json

    replies, run_dir, model, frozen = _study(tmp_path, demo_root, **{"secure-aggregation": "he", "cross-site": False,
                                                          "state-root": str(tmp_path / "state")})
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x][0]
    assert train["secure-aggregation"]["contributors"] == 2 and not train["excluded"]
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    he = [r.content["he"] for r in replies if "he" in r.content and "train-steps" in r.content.get("metrics", {})]
    assert len(he) == 2 and all(record["num-values"] == trainable for record in he)
    _check_global(run_dir, model, frozen)
