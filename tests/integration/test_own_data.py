"""End to end on real scans: the README's "Your own data" commands (import, split, flwr run).

A few real MSD Hippocampus cases (``../shared/realdata``, read only) are copied into a temporary
MSD folder; the README block runs with its ``/data/`` paths pointed there, plus tiny settings (2
rounds, 2 mm spacing, a small UNet) so it takes about a minute. Skipped when the data is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import ROOT, readme_block, run_shell

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ("num-server-rounds=2 local-epochs=1 spacing='2,2,2' roi-size='16,16,16' channels='4,8,16' "
        "crops-per-case=1 batch-size=2 cross-site=false torch-threads=1")
CASES_PER_SITE = 4
SITES = 3


def _realdata() -> Path:
    for parent in ROOT.parents:
        candidate = parent / "shared" / "realdata" / "msd_hippocampus"
        if candidate.is_dir():
            return candidate
    pytest.skip("real data ../shared/realdata/msd_hippocampus not found beside the repo")


def _msd_subset(source: Path, target: Path, n: int) -> None:
    meta = json.loads((source / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    meta["numTraining"] = n
    for entry in meta["training"]:
        for key in ("image", "label"):
            (target / Path(entry[key]).parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(source / entry[key], target / entry[key])
    (target / "dataset.json").write_text(json.dumps(meta))


def test_readme_own_data_commands_run_on_real_hippocampus_cases(isolated_flower, tmp_path):
    env, _ = isolated_flower
    data = tmp_path / "data"
    _msd_subset(_realdata(), data / "Task04_Hippocampus", CASES_PER_SITE * SITES)
    lines = [line for line in readme_block("own-data-command").splitlines() if line.strip()]
    assert [line.split()[:2] for line in lines[:2]] == [["fedimaging", "import"], ["fedimaging", "split"]]
    assert "demo=false" in lines[2] and "data-path-template=" in lines[2] and "num-supernodes=3" in lines[2]
    run_dir = tmp_path / "run"
    for i, line in enumerate(lines):
        command = line.replace("/data/", f"{data}/")
        if i == 2:
            command += f" --run-config \"{TINY} run-dir='{run_dir}' home='{tmp_path / 'home'}'\""
        result = run_shell(command, env, ROOT, timeout=900)
        assert result.returncode == 0, f"{command}\n{(result.stdout + result.stderr)[-5000:]}"

    # the sites described their channels to the server before round 1 (a real Flower query message)
    assert json.loads((run_dir / "channels.json").read_text())["channel-names"] == ["MRI"]
    split = json.loads((data / "hippocampus-sites" / "split.json").read_text())
    assert split["simulated"] is True and sorted(split["counts"]) == ["site-0", "site-1", "site-2"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["phase"]) for r in records] == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    for record in records:
        assert set(record["sites"]) == {"site-0", "site-1", "site-2"} and record["excluded"] == {}
        expected = {s: split["counts"][s]["training" if record["phase"] == "train" else "test"] for s in record["sites"]}
        assert {s: m["num-examples"] for s, m in record["sites"].items()} == expected
        assert all(np.isfinite(m["loss"]) for m in record["sites"].values())
    last = records[-1]["aggregate"]
    assert 0.0 <= last["dice"] <= 1.0 and "dice-class1" in records[-1]["sites"]["site-0"]
