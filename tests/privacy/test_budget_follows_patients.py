"""Issue 18 item 1: the privacy budget follows the patients, not the dataset's training list.

Each test reproduces one way version 1 reset the budget to 0 for the same patients (45.7 -> 0.000
after appending one training entry): appending a case, renaming the dataset, re-running prep,
deleting the ledger; and the explicit migration of version-1 ledgers.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_prep.prep import prepare_site
from data_prep.site_dataset import load_site_dataset
from privacy.ledger import LedgerError, PrivacyLedger
from privacy.ledger_v1 import checksum, dataset_id_for
from privacy.migrate import migrate_file, open_for_training
from privacy.units import case_units, training_case_names
from tests.prep.conftest import pattern_volume, write_volume

DELTA = 1e-5
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (8, 8, 4)
BIG = (1.0, 0.5, 250)  # sigma, q, steps: epsilon about 45, like the issue's


def _uid(i):
    return f"1.2.826.0.1.3680043.8.498.{7000 + i}"


def _series(src, labels, i):
    write_volume(src / f"s{i}", AFFINE, pattern_volume(SHAPE, i), series_uid=_uid(i),
                 phi={"PatientID": f"PAT{0 if i == 3 else i}"})  # series 0 and 3: the same patient
    lab = (np.random.default_rng(i).random(SHAPE) > 0.6).astype(np.uint8)
    nib.save(nib.Nifti1Image(lab, AFFINE), labels / f"{_uid(i)}.nii.gz")


def _units(out):
    return case_units(out, [c.name for c in load_site_dataset(out).training])


def _spend(state, out, sigma, q, steps):
    units = _units(out)
    ledger = open_for_training(state, out, units)
    rid, over = ledger.reserve("study-1", units, sigma, q, steps, epsilon_budget=1e6, delta=DELTA)
    assert over is None
    ledger.settle(rid, steps)
    return ledger.spent(units, DELTA)


@pytest.fixture
def prepared(tmp_path):
    src, labels = tmp_path / "dicom", tmp_path / "labels"
    labels.mkdir()
    for i in range(3):
        _series(src, labels, i)
    out, state = tmp_path / "site-a", tmp_path / "state"
    prepare_site(src, out, labels=labels, name="site-a")
    spent = _spend(state, out, *BIG)
    assert 30 < spent < 80
    return src, labels, out, state, spent


def test_adding_a_case_keeps_what_the_others_spent(prepared):
    src, labels, out, state, spent = prepared
    _series(src, labels, 4)  # a new patient
    prepare_site(src, out, labels=labels, name="site-a")
    units = _units(out)
    assert len(units) == 4
    ledger = open_for_training(state, out, units)
    assert ledger.spent(units, DELTA) == pytest.approx(spent, rel=1e-12)  # version 1: 0.000
    new = [u for u in units if not ledger.case_histories([u])[0]]
    assert len(new) == 1 and ledger.spent(new, DELTA) == 0.0


def test_a_new_series_of_a_known_patient_inherits_the_patients_spend(prepared):
    src, labels, out, state, spent = prepared
    _series(src, labels, 3)  # PAT0 again: series 0's patient
    prepare_site(src, out, labels=labels, name="site-a")
    units = _units(out)
    ledger = open_for_training(state, out, units)
    assert all(ledger.spent([u], DELTA) == pytest.approx(spent, rel=1e-12) for u in units)


def test_renaming_or_re_preparing_the_dataset_keeps_the_spend(prepared, tmp_path):
    src, labels, out, state, spent = prepared
    prepare_site(src, out, labels=labels, name="renamed", force=True)
    assert json.loads((out / "dataset.json").read_text())["name"] == "renamed"
    assert PrivacyLedger.load(state).spent(_units(out), DELTA) == pytest.approx(spent, rel=1e-12)
    # prep again into a new folder with the site's secret: the same pseudonyms, the same patients
    again = tmp_path / "site-a-v2"
    (again / "private").mkdir(parents=True)
    shutil.copy2(out / "private" / "site_secret.key", again / "private" / "site_secret.key")
    prepare_site(src, again, labels=labels, name="site-a", force=True)
    assert training_case_names(again) == training_case_names(out)
    assert PrivacyLedger.load(state).spent(_units(again), DELTA) == pytest.approx(spent, rel=1e-12)


def test_a_deleted_ledger_refuses_training(prepared):
    _, _, out, state, _ = prepared
    (state / "privacy" / "ledger.json").unlink()
    with pytest.raises(LedgerError, match="missing"):
        open_for_training(state, out, _units(out))


def test_appending_a_training_entry_by_hand_keeps_the_spend(tmp_path):
    """The issue's reproduction on a hand-made dataset: one more entry in dataset.json."""
    data, state = tmp_path / "nnunet", tmp_path / "state"
    data.mkdir()
    entries = [{"image": f"imagesTr/BR_{i:03d}_0000.nii.gz", "label": f"labelsTr/BR_{i:03d}.nii.gz"} for i in range(4)]
    (data / "dataset.json").write_text(json.dumps({"name": "brats", "training": entries}))
    units = case_units(data, training_case_names(data))
    ledger = open_for_training(state, data, units)
    ledger.settle(ledger.reserve("s", units, *BIG, epsilon_budget=1e6, delta=DELTA)[0], BIG[2])
    spent = ledger.spent(units, DELTA)
    entries.append({"image": "imagesTr/BR_999_0000.nii.gz", "label": "labelsTr/BR_999.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({"name": "brats-v2", "training": entries}))
    more = case_units(data, training_case_names(data))
    assert open_for_training(state, data, more).spent(more, DELTA) == pytest.approx(spent, rel=1e-12)


def _v1_ledger(state, dataset_id, segments):
    """A version-1 ledger file as fedimaging 0.1 wrote it."""
    history = [[s, q, n] for _, s, q, n in segments]
    entries = [{"run_id": r, "noise_multiplier": s, "sample_rate": q, "steps": n, "rounds": 1,
                "epsilon_after": 1.0, "delta": DELTA, "updated": 0.0} for r, s, q, n in segments]
    body = {"format": "fedimaging-privacy-ledger", "version": 1, "dataset_id": dataset_id, "epsilon_budget": 8.0,
            "delta": DELTA, "accountant": {"mechanism": "rdp", "history": history}, "entries": entries, "pending": []}
    path = state / "privacy" / f"ledger-{dataset_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"body": body, "sha256": checksum(body)}))
    return path


def test_version_1_ledger_of_this_training_list_is_migrated(tmp_path):
    data, state = tmp_path / "d", tmp_path / "state"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"name": "x", "training": [{"image": "imagesTr/a_0000.nii.gz"}]}))
    old = _v1_ledger(state, dataset_id_for(data), [("run-1", 1.0, 0.5, 30)])
    units = case_units(data, training_case_names(data))
    ledger = open_for_training(state, data, units)
    from privacy.accounting import epsilon_of

    assert ledger.spent(units, DELTA) == pytest.approx(epsilon_of([(1.0, 0.5, 30)], DELTA), rel=1e-12)
    assert not old.exists() and old.with_name(old.name + ".migrated").exists()  # kept, renamed
    assert open_for_training(state, data, units).spent(units, DELTA) > 0  # once, not twice
    assert len(PrivacyLedger.load(state).releases) == 1


def test_version_1_ledger_of_another_training_list_is_refused_until_migrated_explicitly(tmp_path):
    data, state = tmp_path / "d", tmp_path / "state"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"name": "x", "training": [{"image": "imagesTr/a_0000.nii.gz"}]}))
    old = _v1_ledger(state, "0123456789abcdef0123456789abcdef", [("run-1", 1.0, 0.5, 30)])
    units = case_units(data, training_case_names(data))
    with pytest.raises(LedgerError, match="privacy migrate"):
        open_for_training(state, data, units)
    migrate_file(state, old, units)
    assert open_for_training(state, data, units).spent(units, DELTA) > 0


def test_a_damaged_version_1_ledger_is_an_error(tmp_path):
    data, state = tmp_path / "d", tmp_path / "state"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"name": "x", "training": [{"image": "imagesTr/a_0000.nii.gz"}]}))
    old = _v1_ledger(state, dataset_id_for(data), [("run-1", 1.0, 0.5, 30)])
    old.write_text(old.read_text().replace('"steps": 30', '"steps": 3'))
    with pytest.raises(LedgerError, match="checksum"):
        open_for_training(state, data, case_units(data, training_case_names(data)))
