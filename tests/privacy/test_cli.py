"""``fedimaging privacy show`` / ``migrate``: table and JSON of a site's ledger, found from
DATA_PATH, --state-dir or a node config; clear errors that name the file, never a traceback."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from app.cli import main as fedimaging
from privacy.ledger import PrivacyLedger
from privacy.ledger_v1 import checksum
from privacy.units import case_units, training_case_names

DELTA = 1e-5


def _dataset(folder, n=2):
    folder.mkdir(parents=True)
    training = [{"image": f"imagesTr/c{i}_0000.nii.gz", "label": f"labelsTr/c{i}.nii.gz"} for i in range(n)]
    (folder / "dataset.json").write_text(json.dumps({"name": "demo", "training": training}))
    return case_units(folder, training_case_names(folder))


@pytest.fixture()
def site(tmp_path):
    data = tmp_path / "site-a"
    units = _dataset(data)
    state = data / "private" / "state"
    ledger = PrivacyLedger.load(state)
    for run, sigma, steps in (("run-a", 1.5, 40), ("run-b", 2.0, 20)):
        rid, _ = ledger.reserve(run, units, sigma, 0.25, steps, epsilon_budget=8.0, delta=DELTA, study_epsilon=7.0)
        ledger.settle(rid, steps)
    return data, state


def expected(*segments):
    acc = RDPAccountant()
    acc.history = list(segments)
    return acc.get_epsilon(delta=DELTA)


def test_table(site, capsys):
    data, _ = site
    assert fedimaging(["privacy", "show", str(data)]) == 0
    out = capsys.readouterr().out
    assert "run-a" in out and "run-b" in out and "1.5000" in out and "0.2500" in out
    total = expected((1.5, 0.25, 40), (2.0, 0.25, 20))
    assert f"largest epsilon of any case or patient {total:.3f} of 8.000" in out
    assert f"study run-a: epsilon {expected((1.5, 0.25, 40)):.3f}" in out
    assert f"Current dataset: 2 training cases (2 trained with DP before), epsilon spent {total:.3f}" in out


def test_json_and_explicit_state_dir(site, capsys, tmp_path):
    data, state = site
    moved = tmp_path / "elsewhere"
    state.rename(moved)
    assert fedimaging(["privacy", "show", str(data), "--state-dir", str(moved), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    total = expected((1.5, 0.25, 40), (2.0, 0.25, 20))
    assert doc["current_dataset"]["epsilon_spent"] == pytest.approx(total, rel=1e-9)
    assert doc["current_dataset"]["epsilon_remaining"] == pytest.approx(8.0 - total, rel=1e-9)
    assert doc["epsilon_budget"] == 8.0
    assert [r["run_id"] for r in doc["releases"]] == ["run-a", "run-b"]
    assert set(doc["studies"]) == {"run-a", "run-b"}


def test_found_from_the_node_config_deploy_init_writes(site, capsys, tmp_path):
    """Issue 19 item 4: deploy init always sets a separate state-dir; show finds it from the node config."""
    data, state = site
    from deploy.init import init_main

    deployment = tmp_path / "deployment"
    assert init_main([str(deployment), "--sites", "site-a", "--data-path", str(data),
                      "--state-dir", str(tmp_path / "srv" / "{site}" / "state"), "--dp-epsilon", "6"]) == 0
    capsys.readouterr()
    (tmp_path / "srv" / "site-a").mkdir(parents=True, exist_ok=True)
    state.rename(tmp_path / "srv" / "site-a" / "state")  # where the node config says the state is
    node_config = deployment / "sites" / "site-a" / "node-config.toml"
    assert fedimaging(["privacy", "show", str(data)]) == 0  # the default place: nothing there now
    assert "no DP training recorded" in capsys.readouterr().out
    assert fedimaging(["privacy", "show", "--node-config", str(node_config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["epsilon_budget"] == 6.0  # the node config's lifetime budget
    assert doc["current_dataset"]["training_cases"] == 2 and len(doc["releases"]) == 2


def test_no_ledger_yet(tmp_path, capsys):
    data = tmp_path / "fresh"
    data.mkdir()
    assert fedimaging(["privacy", "show", str(data)]) == 0
    assert "no DP training recorded" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["{tmp}/nope"], "does not exist"),
    ([], "DATA_PATH, --state-dir or --node-config"),
    (["--node-config", "{tmp}/missing.toml"], "missing.toml"),
    (["--node-config", "{tmp}/bad.toml"], "bad.toml"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    (tmp_path / "bad.toml").write_text("state-dir = 5\n")
    assert fedimaging(["privacy", "show", *[a.format(tmp=tmp_path) for a in args]]) == 2
    assert message in capsys.readouterr().err


def test_damaged_ledger_is_reported(site, capsys):
    data, state = site
    path = state / "privacy" / "ledger.json"
    path.write_text(path.read_text().replace('"steps": 40', '"steps": 4'))
    assert fedimaging(["privacy", "show", str(data)]) == 1
    assert "checksum" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("epsilon_budget", "8"), ("delta", "1e-5"), ("releases", [{"steps": "x"}])])
def test_fields_of_the_wrong_type_give_an_error_naming_the_file(site, capsys, field, value):
    """Issue 18 item 8: a ledger with fields of the wrong type (checksum re-computed) gave a traceback."""
    data, state = site
    path = state / "privacy" / "ledger.json"
    doc = json.loads(path.read_text())
    doc["body"][field] = value
    doc["sha256"] = checksum(doc["body"])
    path.write_text(json.dumps(doc))
    assert fedimaging(["privacy", "show", str(data)]) == 1
    assert str(path) in capsys.readouterr().err


def test_old_ledgers_are_listed_and_migrated_explicitly(tmp_path, capsys):
    data = tmp_path / "d"
    units = _dataset(data, n=3)
    body = {"format": "fedimaging-privacy-ledger", "version": 1, "dataset_id": "0" * 32, "epsilon_budget": 8.0,
            "delta": DELTA, "accountant": {"mechanism": "rdp", "history": [[1.0, 0.5, 30]]},
            "entries": [{"run_id": "old", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 30, "rounds": 2,
                         "epsilon_after": 3.0, "delta": DELTA, "updated": 0.0}], "pending": []}
    old = data / "private" / "state" / "privacy" / f"ledger-{'0' * 32}.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"body": body, "sha256": checksum(body)}))
    assert fedimaging(["privacy", "show", str(data)]) == 0
    assert "NOT MIGRATED" in capsys.readouterr().out
    assert fedimaging(["privacy", "migrate", str(data), old.name]) == 0
    assert "charged to all 3 training cases" in capsys.readouterr().out
    ledger = PrivacyLedger.load(data / "private" / "state")
    assert ledger.spent(units, DELTA) == pytest.approx(expected((1.0, 0.5, 30)), rel=1e-9)
    assert fedimaging(["privacy", "migrate", str(data), old.name]) == 1  # gone (renamed): a clear error
    assert old.name in capsys.readouterr().err


@pytest.mark.parametrize("entry", [{"run_id": "r", "noise_multiplier": "1.0", "sample_rate": 0.5, "steps": 30},
                                   {"run_id": 7, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 30},
                                   {"run_id": "r", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": [30]},
                                   "not an entry"])
def test_an_old_ledger_with_fields_of_the_wrong_type_is_an_error_naming_it(tmp_path, capsys, entry):
    data = tmp_path / "d"
    _dataset(data)
    body = {"format": "fedimaging-privacy-ledger", "version": 1, "dataset_id": "1" * 32, "epsilon_budget": 8.0,
            "delta": DELTA, "accountant": {"mechanism": "rdp", "history": [[1.0, 0.5, 30]]},
            "entries": [entry], "pending": []}
    old = data / "private" / "state" / "privacy" / f"ledger-{'1' * 32}.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"body": body, "sha256": checksum(body)}))
    assert fedimaging(["privacy", "show", str(data)]) == 1
    assert str(old) in capsys.readouterr().err
