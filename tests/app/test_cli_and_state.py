"""The fedimaging CLI dispatcher, demo-data, and the site-private state store."""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main
from app.site_state import SiteStateStore
from data_prep.site_dataset import load_site_dataset


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prep", "demo-data", "predict", "report", "export", "deploy", "privacy"):
        assert name in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2


def test_demo_data_writes_valid_site_datasets(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "demo"), "--sites", "2", "--size", "small", "--seed", "3"]) == 0
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["site-a", "site-b", "site-unseen"]
    dataset = load_site_dataset(tmp_path / "demo" / "site-a")
    assert dataset.kind == "segmentation" and len(dataset.training) == 4
    meta = json.loads((tmp_path / "demo" / "site-b" / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    with pytest.raises(SystemExit):
        main(["demo-data", str(tmp_path / "x"), "--sites", "9"])


def test_site_state_is_kept_per_round_and_survives_a_new_store(tmp_path):
    store = SiteStateStore(tmp_path, "run-1")
    for rnd in (1, 2, 3):
        store.save("scaffold", rnd, {"w": torch.full((2,), float(rnd))})
    restarted = SiteStateStore(tmp_path, "run-1")  # a SuperNode restart: nothing in memory
    assert restarted.load_before("scaffold", 4)["w"].tolist() == [3.0, 3.0]
    # a round the server re-sends after a crash starts from the state before it
    assert restarted.load_before("scaffold", 3)["w"].tolist() == [2.0, 2.0]
    assert restarted.load_before("scaffold", 2) is None  # only the last two rounds are kept
    assert SiteStateStore(tmp_path, "run-2").load_before("scaffold", 9) is None
    with pytest.raises(ValueError, match="safe folder name"):
        SiteStateStore(tmp_path, "../escape")
