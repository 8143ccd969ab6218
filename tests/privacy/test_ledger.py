"""PrivacyLedger (version 2): per-case epsilon matches an independent Opacus accountant, composes
over every release a case or patient was in, persists, and refuses files it cannot trust."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from privacy.ledger import LedgerError, PrivacyLedger, default_delta
from privacy.units import unit_key

DELTA = 1e-5


def independent_epsilon(segments, delta=DELTA):
    """Epsilon from an Opacus accountant fed one step() per step (no shared code with the ledger)."""
    acc = RDPAccountant()
    for sigma, q, steps in segments:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def cases(*names, subjects=None):
    subjects = subjects or {}
    return [tuple([unit_key("case", n)] + ([unit_key("subject", subjects[n])] if n in subjects else [])) for n in names]


def spend(ledger, run, units, sigma, q, steps, budget=1e6, study=None):
    rid, over = ledger.reserve(run, units, sigma, q, steps, epsilon_budget=budget, delta=DELTA, study_epsilon=study)
    assert over is None, over
    ledger.settle(rid, steps)


def test_empty_ledger_spends_nothing_and_writes_nothing(tmp_path):
    ledger = PrivacyLedger.load(tmp_path)
    assert ledger.spent(cases("a"), DELTA) == 0.0 and ledger.total_steps == 0
    assert not (tmp_path / "privacy").exists()


def test_per_case_epsilon_composes_over_the_releases_each_case_was_in(tmp_path):
    ledger = PrivacyLedger.load(tmp_path)
    spend(ledger, "run-a", cases("a", "b"), 1.1, 0.25, 12)
    spend(ledger, "run-b", cases("b", "c"), 0.9, 0.2, 15)
    again = PrivacyLedger.load(tmp_path)  # a restart reads the same from disk
    only_a = independent_epsilon([(1.1, 0.25, 12)])
    both = independent_epsilon([(1.1, 0.25, 12), (0.9, 0.2, 15)])
    only_c = independent_epsilon([(0.9, 0.2, 15)])
    assert again.spent(cases("a"), DELTA) == pytest.approx(only_a, rel=1e-9)
    assert again.spent(cases("b"), DELTA) == pytest.approx(both, rel=1e-9)  # in both trainings: composes
    assert again.spent(cases("c"), DELTA) == pytest.approx(only_c, rel=1e-9)
    # a training set costs what its worst-off case has spent; a never-trained case adds nothing
    assert again.spent(cases("a", "c", "new"), DELTA) == pytest.approx(max(only_a, only_c), rel=1e-9)
    assert again.spent(cases("a", "b", "new"), DELTA) == pytest.approx(both, rel=1e-9)
    assert again.spent(cases("new"), DELTA) == 0.0
    assert again.spent_anywhere(DELTA) == pytest.approx(both, rel=1e-9)


def test_two_series_of_one_patient_compose_as_one_person(tmp_path):
    ledger = PrivacyLedger.load(tmp_path)
    spend(ledger, "run-a", cases("ct-1", subjects={"ct-1": "subj01"}), 1.0, 0.3, 20)
    later = cases("ct-2", subjects={"ct-2": "subj01"})  # another series, same patient pseudonym
    spend(ledger, "run-b", later, 1.0, 0.3, 20)
    assert ledger.spent(later, DELTA) == pytest.approx(independent_epsilon([(1.0, 0.3, 40)]), rel=1e-9)
    assert ledger.spent(cases("ct-3", subjects={"ct-3": "other1"}), DELTA) == 0.0


def test_rounds_of_a_run_merge_and_stale_objects_lose_nothing(tmp_path):
    a, b = PrivacyLedger.load(tmp_path), PrivacyLedger.load(tmp_path)
    spend(a, "run-a", cases("x"), 1.0, 0.1, 10)
    spend(a, "run-a", cases("x"), 1.0, 0.1, 5)
    spend(b, "run-b", cases("x"), 1.0, 0.1, 10)  # b was loaded before a wrote: re-reads under the lock
    final = PrivacyLedger.load(tmp_path)
    assert [(r.run_id, r.steps, r.rounds) for r in final.releases] == [("run-a", 15, 2), ("run-b", 10, 1)]
    assert final.spent(cases("x"), DELTA) == pytest.approx(independent_epsilon([(1.0, 0.1, 25)]), rel=1e-9)


def test_reservation_counts_until_settled_and_refuses_what_does_not_fit(tmp_path):
    ledger = PrivacyLedger.load(tmp_path)
    rid, _ = ledger.reserve("r", cases("x"), 1.0, 0.2, 10, epsilon_budget=50.0, delta=DELTA)
    crashed = PrivacyLedger.load(tmp_path)  # a process that died here: the booking is on disk and charged
    assert crashed.spent(cases("x"), DELTA) == pytest.approx(independent_epsilon([(1.0, 0.2, 10)]), rel=1e-9)
    ledger.settle(rid, 7)
    eps = PrivacyLedger.load(tmp_path).spent(cases("x"), DELTA)
    assert eps == pytest.approx(independent_epsilon([(1.0, 0.2, 7)]), rel=1e-9)
    assert ledger.reserve("r2", cases("x"), 1.0, 0.2, 10_000, epsilon_budget=eps * 1.01, delta=DELTA) == (None, "lifetime")
    # a case that never trained may still train under the same budget
    assert ledger.reserve("r2", cases("y"), 1.0, 0.2, 7, epsilon_budget=eps * 1.01, delta=DELTA)[1] is None
    # the study's share: its own history against study_epsilon
    study_eps = independent_epsilon([(1.0, 0.2, 7)])
    assert ledger.reserve("r", cases("z"), 1.0, 0.2, 1, epsilon_budget=50.0, delta=DELTA,
                          study_epsilon=study_eps * 1.001) == (None, "study")
    assert PrivacyLedger.load(tmp_path).total_steps == 14


def test_a_deleted_ledger_is_an_error_not_a_fresh_start(tmp_path):
    ledger = PrivacyLedger.load(tmp_path)
    spend(ledger, "r", cases("x"), 1.0, 0.2, 30)
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="missing.*ledger.marker|ledger.marker"):
        PrivacyLedger.load(tmp_path)
    with pytest.raises(LedgerError, match="missing"):
        ledger.reserve("r", cases("x"), 1.0, 0.2, 1, epsilon_budget=8.0, delta=DELTA)


def test_a_ledger_copied_from_another_state_folder_is_refused(tmp_path):
    for site in ("a", "b"):
        spend(PrivacyLedger.load(tmp_path / site), "r", cases("x"), 1.0, 0.2, 3)
    (tmp_path / "a" / "privacy" / "ledger.json").replace(tmp_path / "b" / "privacy" / "ledger.json")
    with pytest.raises(LedgerError, match="copied from elsewhere"):
        PrivacyLedger.load(tmp_path / "b")


def test_hand_edited_ledger_is_an_error_not_a_reset(tmp_path):
    ledger = PrivacyLedger.load(tmp_path)
    spend(ledger, "r", cases("x"), 1.0, 0.2, 30)
    doc = json.loads(ledger.path.read_text())
    doc["body"]["releases"][0]["steps"] = 1  # "forget" 29 steps
    ledger.path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="checksum"):
        PrivacyLedger.load(tmp_path)


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"body": {}, "sha256": "x"}', "[" * 100_000])
def test_corrupt_ledger_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "privacy" / "ledger.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(LedgerError, match="ledger.json"):
        PrivacyLedger.load(tmp_path)


@pytest.mark.parametrize("field,value", [
    ("epsilon_budget", "8"), ("delta", [1]), ("unit_sets", {"a": 1}), ("unit_sets", [["case:nothex"]]),
    ("releases", [{"id": 1}]), ("releases.steps", "40"), ("releases.steps", 2.5), ("releases.units", 7),
    ("releases.noise_multiplier", None), ("releases.sample_rate", 3.0), ("releases.run_id", ["x"]),
    ("releases.open", "no"), ("migrated", "x"), ("ledger_id", 5), ("mechanism", 1),
])
def test_fields_of_the_wrong_type_are_an_error_naming_the_file(tmp_path, field, value):
    """A ledger whose checksum matches (written by a buggy tool, or re-signed) is still checked."""
    from privacy.ledger_v1 import checksum

    ledger = PrivacyLedger.load(tmp_path)
    spend(ledger, "r", cases("x"), 1.0, 0.2, 3)
    doc = json.loads(ledger.path.read_text())
    if field.startswith("releases."):
        doc["body"]["releases"][0][field.split(".")[1]] = value
    else:
        doc["body"][field] = value
    doc["sha256"] = checksum(doc["body"])
    ledger.path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="ledger.json"):
        PrivacyLedger.load(tmp_path)


def test_reserve_needs_hashed_units(tmp_path):
    with pytest.raises(ValueError, match="unit keys"):
        PrivacyLedger.load(tmp_path).reserve("r", [("case-123",)], 1.0, 0.2, 1, epsilon_budget=8.0, delta=DELTA)


def test_default_delta_is_below_one_over_n():
    assert default_delta(20) == 1e-5
    assert default_delta(50_000) == pytest.approx(1 / 500_000)
    for n in (1, 7, 10_000, 10**6):
        assert default_delta(n) < 1 / n
