"""The per-round console table: fixed width, numbers taken from the metrics.jsonl records."""

from __future__ import annotations

from app.console import format_header, format_round_row, format_table, round_summary

from .fixtures import synthetic_metrics


def _round(records, rnd):
    return [r for r in records if r["round"] == rnd]


def test_row_values_come_from_the_records():
    records = synthetic_metrics(rounds=4, dp=True)
    train, evaluate = _round(records, 3)
    s = round_summary([train, evaluate], "dice")
    assert s["sites"] == len(train["sites"]) + len(train["excluded"]) == 3
    assert s["excluded"] == 1
    assert s["train_loss"] == train["aggregate"]["loss"]
    assert s["metric"] == evaluate["aggregate"]["dice"]
    assert s["epsilon"] == max(m["dp-epsilon-spent"] for m in train["sites"].values())
    assert s["seconds"] == train["seconds"] + evaluate["seconds"]
    row = format_round_row(3, [train, evaluate], "dice").split()
    assert row[0] == "3" and row[1] == "3" and row[2] == "1"
    assert float(row[3]) == round(train["aggregate"]["loss"], 4)
    assert float(row[5]) == round(evaluate["aggregate"]["dice"], 4)
    assert float(row[6]) == round(s["epsilon"], 2)


def test_fixed_width_and_missing_values():
    header, rule = format_header("dice").splitlines()
    assert "Dice" in header and "epsilon" in header and set(rule) == {"-"}
    records = synthetic_metrics(rounds=2, dp=False)
    full = format_round_row(1, _round(records, 1), "dice")
    train_only = format_round_row(12, [r for r in _round(records, 2) if r["phase"] == "train"], "dice")
    assert len(full) == len(train_only) == len(header)
    cells = train_only.split()
    assert cells[4] == "-" and cells[5] == "-" and cells[6] == "-"  # no evaluate, no DP
    assert format_round_row(1, [], "auc").split()[1:3] == ["-", "0"]
    assert "AUC" in format_header("auc")


def test_table_has_one_row_per_round():
    records = synthetic_metrics(rounds=5)
    lines = format_table(records + [{"round": 0, "phase": "evaluate", "seconds": 0.0}], "dice").splitlines()
    assert len(lines) == 2 + 5
    assert [int(line.split()[0]) for line in lines[2:]] == [1, 2, 3, 4, 5]


def test_personal_column_shows_the_personal_models_metric():
    records = synthetic_metrics(rounds=2, dp=False)
    train, evaluate = _round(records, 1)
    evaluate = {**evaluate, "aggregate": {**evaluate["aggregate"], "personal-dice": 0.8123}}
    header = format_header("dice", personal=True).splitlines()[0]
    full = format_round_row(1, [train, evaluate], "dice", personal=True)
    train_only = format_round_row(2, [r for r in _round(records, 2) if r["phase"] == "train"], "dice", personal=True)
    assert header.endswith("personal Dice") and len(full) == len(train_only) == len(header)
    assert full.split()[-1] == "0.8123" and train_only.split()[-1] == "-"
    assert format_round_row(1, [train, evaluate], "dice") == full[: len(format_header("dice").splitlines()[0])]
