"""End to end: the README's run command, for real (local SuperLink, Ray, ServerApp, ClientApps).

Tiny settings (2 rounds, small demo volumes, a small UNet) keep it around a minute or two. The
SuperLink it starts uses a private FLWR_HOME and private ports, and is stopped afterwards.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from tests.integration.conftest import ROOT, readme_block, run_shell

pytestmark = pytest.mark.integration

TINY = (
    "num-server-rounds=2 local-epochs=1 demo-size='small' spacing='6,6,6' roi-size='16,16,16' "
    "channels='8,16,32' crops-per-case=1 batch-size=2 cross-site=false"
)


def _flwr_part(command: str) -> str:
    """The README run command without its leading ``pip install ... &&`` (already installed)."""
    parts = [p.strip() for p in command.split("&&")]
    flwr = [p for p in parts if "flwr run" in p]
    assert len(flwr) == 1, command
    return flwr[0]


def test_readme_run_command_disables_runtime_dependency_installation():
    command = readme_block("run-command")
    assert "pip install -e ." in command
    flwr = _flwr_part(command)
    assert flwr.startswith("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream")
    assert "num-supernodes=3" in flwr


def test_readme_run_command_trains_and_writes_the_run_directory(isolated_flower, tmp_path):
    env, flwr_home = isolated_flower
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # only the command may set it
    run_dir = tmp_path / "run"
    command = _flwr_part(readme_block("run-command")) + (
        f" --run-config \"{TINY} run-dir='{run_dir}' home='{tmp_path / 'home'}'\""
    )
    result = run_shell(command, env, ROOT, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"Run directory: {run_dir}" in output
    assert "Final global model (round 2)" in output

    # The app ran in this environment, not in a runtime environment Flower installed.
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["_environment"]["python-prefix"] == sys.prefix
    assert config["num-server-rounds"] == 2 and config["spacing"] == [6.0, 6.0, 6.0]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [(r["round"], r["phase"]) for r in records]
    assert phases == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    for record in records:
        assert set(record["sites"]) == {"site-a", "site-b", "site-c"}
        assert record["excluded"] == {}
        assert record["seconds"] > 0
        weights = {s: m["num-examples"] for s, m in record["sites"].items()}
        if record["phase"] == "train":
            # num-examples are cases: the small demo has 4 training cases per site
            assert weights == {"site-a": 4, "site-b": 4, "site-c": 4}
            keys = ["loss"]
        else:
            assert weights == {"site-a": 2, "site-b": 2, "site-c": 2}
            keys = ["loss", "dice", "hd95"]
        for key in keys:
            values = [m[key] for m in record["sites"].values()]
            expected = np.average(values, weights=list(weights.values()))
            assert record["aggregate"][key] == pytest.approx(expected, rel=1e-9)
        if record["phase"] == "evaluate":
            assert 0.0 <= record["aggregate"]["dice"] <= 1.0

    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert set(final) == set(last) == set(best)
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(re.search(r"conv\.weight$", k) for k in final)
