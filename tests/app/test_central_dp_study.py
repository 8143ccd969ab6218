"""Central DP through the real ServerApp and ClientApp (in-process grid, tiny volumes).

With ``central-dp=client-side`` the real ClientApp's train mod must clip each site's update
before it leaves: the norm the server measures on what arrived is at most the clipping norm.
"""

from __future__ import annotations

import json

import pytest
import torch

from app.client_app import app as client_app
from app.server_app import run_study
from bench.local_grid import LocalGrid
from tests.conftest import share_demo

TINY = {
    "num-server-rounds": 1, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16",
    "channels": "4,8,16", "batch-size": 2, "cross-site": False, "demo-sites": 2,
}

_shared_demo = share_demo(TINY)  # the suite's demo sites (tests/conftest.py)


def test_client_side_central_dp_clips_at_the_real_sites(tmp_path):
    clip, z = 1e-3, 0.5
    raw = {**TINY, "home": str(tmp_path / "home"), "run-dir": str(tmp_path / "run"), "central-dp": "client-side",
           "central-dp-clipping-norm": clip, "central-dp-noise-multiplier": z}
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], raw)
    run_dir = run_study(grid, raw, run_id=21)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["phase"] == "train"][0]
    assert set(train["sites"]) == {"site-a", "site-b"} and not train["excluded"]
    for site, metrics in train["sites"].items():
        assert 0 < metrics["update-norm"] <= clip * (1 + 1e-5), site
    assert train["central-dp"]["mode"] == "client-side" and train["central-dp"]["releases"] == 1
    # the released model = initial + mean of two clipped updates + noise of std z * C / 2
    initial = torch.load(run_dir / "server_state" / "initial.pt", weights_only=True)
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    diff = torch.cat([(final[k] - initial[k]).flatten() for k in final])
    assert diff.std().item() == pytest.approx(z * clip / 2, rel=0.1)
