"""bench.strategies --quick with personalization arms: personal_site_dice beside site_dice (tiny demo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import strategies

pytestmark = pytest.mark.slow  # a federated arm, pooled and local-only, on the small demo

TINY = ("num-server-rounds=1 spacing=6,6,6 roi-size=16,16,16 channels=4,8,16 crops-per-case=1 batch-size=2 "
        "demo-sites=2 torch-threads=1")


def test_quick_run_reports_each_sites_personal_and_global_dice(tmp_path, capsys, demo_root):
    before = torch.get_num_threads()
    try:
        assert strategies.main(["--quick", "--out", str(tmp_path), "--strategies", "fedbn-ditto",
                                "--run-config", f"{TINY} demo-root={demo_root}"]) == 0
    finally:
        torch.set_num_threads(before)
    report = json.loads((tmp_path / "strategies.json").read_text())
    results = report["results"]
    assert report["quick"] and list(results) == ["pooled", "local", "fedbn-ditto"]
    assert "personal_site_dice" not in results["pooled"] and "personal_site_dice" not in results["local"]
    for arm, strategy, personalization in (("fedbn-ditto", "fedbn", "ditto"),):
        r = results[arm]
        assert set(r["personal_site_dice"]) == set(r["site_dice"]) == {"site-a", "site-b"}
        run_dir = tmp_path / "runs" / f"{arm}-seed42"
        config = json.loads((run_dir / "run_config.json").read_text())
        assert (config["strategy"], config["personalization"]) == (strategy, personalization)
        # the numbers are the last evaluate phase's, as the sites reported them
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [x for x in lines if x["phase"] == "evaluate"][-1]["sites"]
        for site in r["site_dice"]:
            assert r["site_dice"][site] == pytest.approx(last[site]["dice"])
            assert r["personal_site_dice"][site] == pytest.approx(last[site]["personal-dice"])
            assert 0.0 <= r["personal_site_dice"][site] <= 1.0
        weights = [last[s]["num-examples"] for s in sorted(last)]
        expected = np.average([last[s]["personal-dice"] for s in sorted(last)], weights=weights)
        assert r["personal_mean_dice"] == pytest.approx(expected)
    table = (tmp_path / "strategies.md").read_text()
    assert "| fedbn-ditto: personal models |" in table and "fedbn-ditto: every site's personal Dice" in table
    # The learning curves as a table: per round, the aggregated Dice of the global and the personal models.
    curves = [x for x in table.split("## Mean Dice per round")[1].splitlines() if x.startswith("|")]
    assert curves[0].split("|")[1:-1] == [" round ", " fedbn-ditto ", " fedbn-ditto: personal models "]
    evaluations = [x for x in lines if x["phase"] == "evaluate" and x.get("sites")]
    assert len(curves) == 2 + len(evaluations)
    for row, record in zip(curves[2:], evaluations):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert int(cells[0]) == record["round"]
        assert float(cells[1]) == pytest.approx(record["aggregate"]["dice"], abs=5e-4)
        assert float(cells[2]) == pytest.approx(record["aggregate"]["personal-dice"], abs=5e-4)
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()


def test_unknown_arms_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        strategies.main(["--quick", "--out", str(tmp_path), "--strategies", "ditto,fedbn+ditto"])
    assert strategies.arm_overrides("finetune") == {"strategy": "fedavg", "personalization": "finetune"}
    assert strategies.arm_overrides("scaffold")["strategy"] == "scaffold"
