"""bench.transfer --quick (tiny volumes, 1 round, 2 CT sites, the MR site split in 2): transfer.json
against an independent reading of the kept runs, and the transfer arms start from the pretrained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.site_runtime import _DP_SESSIONS
from bench import transfer
from strategies import load_weights

TINY = ("spacing=6,6,6 roi-size=16,16,16 channels=4,8,16 crops-per-case=1 batch-size=2 torch-threads=1 "
        "cross-site=false")


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick(tmp_path_factory, demo_root):
    out = tmp_path_factory.mktemp("transfer")
    before = torch.get_num_threads()
    try:
        assert transfer.main(["--quick", "--out", str(out), "--run-config", f"{TINY} demo-root={demo_root}"]) == 0
    finally:
        torch.set_num_threads(before)
    return out, json.loads((out / "transfer.json").read_text())


@pytest.mark.slow  # five 1-round studies on the small demo (shared by this file's slow tests)
def test_every_arm_is_what_its_kept_run_recorded(quick):
    out, report = quick
    results = report["results"]
    assert list(results) == list(transfer.ARMS) and report["rounds"] == 1 and report["quick"]
    assert set(results["pretrain-ct"]["site_dice"]) == {"site-a", "site-b"}
    assert report["mr_sites"]["source"] == "site-d" and set(report["mr_sites"]["simulated_split"]["counts"]) == {"site-0", "site-1"}
    for name, r in results.items():
        run_dir = out / "runs" / name
        records = _records(run_dir)
        evaluations = [x for x in records if x["phase"] == "evaluate" and x.get("sites")]
        assert len(evaluations) == 1 and r["curve"] == [e["aggregate"]["dice"] for e in evaluations]
        last = evaluations[-1]["sites"]
        assert r["site_dice"] == {s: pytest.approx(m["dice"]) for s, m in last.items()}
        expected = np.average([m["dice"] for m in last.values()], weights=[m["num-examples"] for m in last.values()])
        assert r["mean_dice"] == pytest.approx(expected) and 0.0 <= r["mean_dice"] <= 1.0
        config = json.loads((run_dir / "run_config.json").read_text())
        assert config["dp-epsilon"] == config["dp-study-epsilon"] == (8.0 if "dp" in name else 0.0)
        assert config["init-from"] == (str(out / "runs" / "pretrain-ct" / "final_model.pt") if "transfer" in name else "")
        assert config["freeze"] == (["encoder"] if "freeze" in name else [])
        train = [x for x in records if x["phase"] == "train"][-1]["sites"]
        if "dp" in name:
            assert r["epsilon_spent"] == {s: pytest.approx(m["dp-epsilon-spent"]) for s, m in train.items()}
            # more than the default quarter of the budget, never more than all of it
            assert all(2.0 < e <= 8.0 + 1e-6 for e in r["epsilon_spent"].values())
        else:
            assert "epsilon_spent" not in r and all("dp-epsilon-spent" not in m for m in train.values())
        if name != "pretrain-ct":
            assert set(last) == {"site-0", "site-1"}
    md = (out / "transfer.md").read_text()
    assert all(f"| {name} |" in md for name in transfer.ARMS) and "mr-transfer (" in md


@pytest.mark.slow
def test_transfer_arms_start_from_the_pretrained_model_and_freezing_sends_less(quick):
    out, report = quick
    results = report["results"]
    pretrained = load_weights(out / "runs" / "pretrain-ct" / "final_model.pt")
    for name in ("mr-transfer", "mr-dp-transfer-freeze"):
        initial = load_weights(out / "runs" / name / "server_state" / "initial.pt")
        matched = [n for n in initial if n in pretrained and initial[n].shape == pretrained[n].shape]
        assert len(matched) == len(initial) == len(pretrained)
        assert all(initial[n].tobytes() == pretrained[n].tobytes() for n in matched), name
    scratch = load_weights(out / "runs" / "mr-scratch" / "server_state" / "initial.pt")
    assert any(scratch[n].tobytes() != pretrained[n].tobytes() for n in scratch)  # scratch does not
    total = sum(a.size for a in pretrained.values())
    for name in ("pretrain-ct", "mr-scratch", "mr-transfer", "mr-dp-scratch"):
        assert results[name]["sent_values"] == total
    for name in ("mr-dp-scratch", "mr-dp-transfer-freeze"):  # what Opacus trained at each site
        sessions = [s for k, s in _DP_SESSIONS.items() if str(out / "state" / name) in k[2]]
        assert len(sessions) == 2
        for session in sessions:
            params = [p for group in session.optimizer.original_optimizer.param_groups for p in group["params"]]
            assert sum(p.numel() for p in params) == results[name]["trainable_parameters"]
    frozen_arm = results["mr-dp-transfer-freeze"]
    assert frozen_arm["trainable_parameters"] < results["mr-dp-scratch"]["trainable_parameters"] == total
    initial = load_weights(out / "runs" / "mr-dp-transfer-freeze" / "server_state" / "initial.pt")
    final = load_weights(out / "runs" / "mr-dp-transfer-freeze" / "final_model.pt")
    changed = sum(final[n].size for n in final if final[n].tobytes() != initial[n].tobytes())
    # the UNet has no buffers: a reply carries exactly the trainable values; all the others stayed fixed
    assert changed <= frozen_arm["sent_values"] == frozen_arm["trainable_parameters"] < total


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--pretrain-rounds", "0"], ["--dp-epsilon", "0"],
                                  ["--run-config", "demo-sites=4"], ["--run-config", "demo-sites=0"]])
def test_bad_arguments_stop_before_any_study(tmp_path, argv, capsys):
    with pytest.raises(SystemExit):
        transfer.main(["--quick", "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()
    assert "demo-sites" in capsys.readouterr().err or "demo-sites" not in " ".join(argv)
