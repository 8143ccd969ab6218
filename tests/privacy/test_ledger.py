"""PrivacyLedger: epsilon matches an independent Opacus accountant, persists, refuses bad files."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from privacy.ledger import (
    LedgerError,
    PrivacyLedger,
    dataset_id_for,
    dataset_id_from_training_list,
    default_delta,
    format_ledger,
    ledger_path,
)

DELTA = 1e-5


def independent_epsilon(segments, delta=DELTA):
    """Epsilon from an Opacus accountant fed one step() per step (no shared code with the ledger)."""
    acc = RDPAccountant()
    for sigma, q, steps in segments:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_empty_ledger_spends_nothing(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, "ds1")
    assert ledger.spent(DELTA) == 0.0
    assert ledger.total_steps == 0
    assert not ledger_path(tmp_path, "ds1").exists()


def test_epsilon_matches_independent_accountant_and_persists_across_restart(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, "ds1")
    eps1 = ledger.record("run-a", 1.1, 0.25, 12, DELTA, epsilon_budget=8.0)
    assert eps1 == pytest.approx(independent_epsilon([(1.1, 0.25, 12)]), rel=1e-9)
    eps2 = ledger.record("run-a", 1.1, 0.25, 8, DELTA)
    assert eps2 == pytest.approx(independent_epsilon([(1.1, 0.25, 20)]), rel=1e-9)

    # "restart": a fresh object reads the same spend from disk
    again = PrivacyLedger.load(tmp_path, "ds1")
    assert again.spent(DELTA) == pytest.approx(eps2, rel=1e-12)
    assert again.total_steps == 20
    assert [(e.run_id, e.steps, e.rounds) for e in again.entries] == [("run-a", 20, 2)]
    assert again.epsilon_budget == 8.0

    # a second run on the same dataset adds to the same lifetime total
    eps3 = again.record("run-b", 0.9, 0.2, 15, DELTA)
    expected = independent_epsilon([(1.1, 0.25, 20), (0.9, 0.2, 15)])
    assert eps3 == pytest.approx(expected, rel=1e-9)
    assert eps3 > eps2
    assert PrivacyLedger.load(tmp_path, "ds1").spent(DELTA) == pytest.approx(expected, rel=1e-9)
    # another dataset has its own ledger
    assert PrivacyLedger.load(tmp_path, "ds2").spent(DELTA) == 0.0


def test_stale_ledger_objects_do_not_lose_spend(tmp_path):
    """Two runs holding the ledger open at once: record() re-reads the file, both spends count."""
    a = PrivacyLedger.load(tmp_path, "ds")
    b = PrivacyLedger.load(tmp_path, "ds")
    a.record("run-a", 1.0, 0.1, 10, DELTA)
    b.record("run-b", 1.0, 0.1, 10, DELTA)
    assert PrivacyLedger.load(tmp_path, "ds").total_steps == 20


def test_would_exceed(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, "ds")
    ledger.record("r", 1.0, 0.2, 50, DELTA)
    spent = ledger.spent(DELTA)
    after = independent_epsilon([(1.0, 0.2, 60)])
    assert not ledger.would_exceed(1.0, 0.2, 10, after * 1.001, DELTA)
    assert ledger.would_exceed(1.0, 0.2, 10, (spent + after) / 2, DELTA)


def test_reservation_counts_until_settled_and_survives_a_crash(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, "ds")
    rid = ledger.reserve("r", 1.0, 0.2, 10, epsilon_budget=50.0, delta=DELTA)
    assert rid is not None
    # a process that died here: the reservation is on disk and charged
    crashed = PrivacyLedger.load(tmp_path, "ds")
    assert crashed.spent(DELTA) == pytest.approx(independent_epsilon([(1.0, 0.2, 10)]), rel=1e-9)
    eps = ledger.settle(rid, 7, DELTA)
    assert eps == pytest.approx(independent_epsilon([(1.0, 0.2, 7)]), rel=1e-9)
    reloaded = PrivacyLedger.load(tmp_path, "ds")
    assert reloaded.pending == [] and reloaded.total_steps == 7
    # a reservation that does not fit is refused and nothing is booked
    assert ledger.reserve("r", 1.0, 0.2, 10_000, epsilon_budget=eps * 1.01, delta=DELTA) is None
    assert PrivacyLedger.load(tmp_path, "ds").total_steps == 7


def test_hand_edited_ledger_is_an_error_not_a_reset(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, "ds")
    ledger.record("r", 1.0, 0.2, 30, DELTA)
    path = ledger_path(tmp_path, "ds")
    doc = json.loads(path.read_text())
    doc["body"]["accountant"]["history"][0][2] = 1  # "forget" 29 steps
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="checksum"):
        PrivacyLedger.load(tmp_path, "ds")
    with pytest.raises(LedgerError, match="checksum"):
        ledger.record("r", 1.0, 0.2, 1, DELTA)


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"body": {}, "sha256": "x"}'])
def test_corrupt_ledger_is_an_error_naming_the_file(tmp_path, content):
    path = ledger_path(tmp_path, "ds")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(LedgerError, match=str(path.name)):
        PrivacyLedger.load(tmp_path, "ds")


def test_ledger_of_another_dataset_is_rejected(tmp_path):
    PrivacyLedger.load(tmp_path, "ds-a").record("r", 1.0, 0.2, 3, DELTA)
    ledger_path(tmp_path, "ds-a").rename(ledger_path(tmp_path, "ds-b"))
    with pytest.raises(LedgerError, match="belongs to dataset"):
        PrivacyLedger.load(tmp_path, "ds-b")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 200])
def test_dataset_id_cannot_escape_the_state_dir(tmp_path, bad):
    with pytest.raises(ValueError):
        PrivacyLedger.load(tmp_path, bad)


def test_dataset_id_follows_the_training_list(tmp_path):
    training = [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "demo", "training": training}))
    ident = dataset_id_for(tmp_path)
    assert ident == dataset_id_from_training_list(training, "demo")
    assert ident != dataset_id_from_training_list(training + [{"image": "b", "label": "c"}], "demo")
    with pytest.raises(LedgerError, match="dataset.json"):
        dataset_id_for(tmp_path / "missing")


def test_default_delta_is_below_one_over_n():
    assert default_delta(20) == 1e-5
    assert default_delta(50_000) == pytest.approx(1 / 500_000)
    for n in (1, 7, 10_000, 10**6):
        assert default_delta(n) < 1 / n


def test_format_ledger_lists_runs_and_totals(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, "ds")
    ledger.record("run-a", 1.25, 0.2, 10, DELTA, epsilon_budget=8.0)
    text = format_ledger(ledger)
    assert "run-a" in text and "1.2500" in text and "of 8.000" in text
    assert f"{ledger.spent(DELTA):.3f}" in text
