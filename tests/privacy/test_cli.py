"""``fedimaging privacy show``: table and JSON of a site's ledger; clear errors."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from privacy.cli import show_main
from privacy.ledger import PrivacyLedger, dataset_id_for, ledger_path

DELTA = 1e-5


@pytest.fixture()
def site(tmp_path):
    data = tmp_path / "site-a"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({
        "name": "demo", "training": [{"image": "imagesTr/c1.nii.gz", "label": "labelsTr/c1.nii.gz"}],
    }))
    state = data / "private" / "state"
    ledger = PrivacyLedger.load(state, dataset_id_for(data))
    ledger.record("run-a", 1.5, 0.25, 40, DELTA, epsilon_budget=8.0)
    ledger.record("run-b", 2.0, 0.25, 20, DELTA, epsilon_budget=8.0)
    return data, state


def expected_epsilon():
    acc = RDPAccountant()
    acc.history = [(1.5, 0.25, 40), (2.0, 0.25, 20)]
    return acc.get_epsilon(delta=DELTA)


def test_table(site, capsys):
    data, _ = site
    assert show_main([str(data)]) == 0
    out = capsys.readouterr().out
    assert "Current dataset" in out
    assert "run-a" in out and "run-b" in out and "1.5000" in out and "0.2500" in out
    assert f"epsilon spent {expected_epsilon():.3f} of 8.000" in out


def test_json_and_explicit_state_dir(site, capsys, tmp_path):
    data, state = site
    moved = tmp_path / "elsewhere"
    state.rename(moved)
    assert show_main([str(data), "--state-dir", str(moved), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (only,) = doc["ledgers"]
    assert only["current"] is True
    assert only["epsilon_spent"] == pytest.approx(expected_epsilon(), rel=1e-9)
    assert only["epsilon_budget"] == 8.0
    assert only["epsilon_remaining"] == pytest.approx(8.0 - expected_epsilon(), rel=1e-9)
    assert [r["run_id"] for r in only["runs"]] == ["run-a", "run-b"]
    assert only["total_steps"] == 60


def test_no_ledger_yet(tmp_path, capsys):
    data = tmp_path / "fresh"
    data.mkdir()
    assert show_main([str(data)]) == 0
    assert "No privacy ledger" in capsys.readouterr().out


def test_missing_dataset_folder(tmp_path, capsys):
    assert show_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_damaged_ledger_is_reported(site, capsys):
    data, state = site
    path = ledger_path(state, dataset_id_for(data))
    path.write_text(path.read_text().replace('"steps": 40', '"steps": 4'))
    assert show_main([str(data)]) == 1
    assert "checksum" in capsys.readouterr().err
