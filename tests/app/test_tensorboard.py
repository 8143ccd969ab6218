"""TensorBoard event files carry the same numbers as metrics.jsonl."""

from __future__ import annotations

import pytest

from app.tensorboard_log import TensorBoardLog

pytest.importorskip("tensorboard")


def test_round_records_become_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoardLog(tmp_path)
    for rnd, dice in ((1, 0.25), (2, 0.5)):
        board.log_round(rnd, [
            {"round": rnd, "phase": "train", "seconds": 3.0, "sites": {"site-a": {"loss": 1.0 / rnd}},
             "aggregate": {"loss": 1.0 / rnd}, "excluded": {"site-b": "non-finite"}},
            {"round": rnd, "phase": "evaluate", "seconds": 1.0, "sites": {"site-a": {"dice": dice, "hd95": None}},
             "aggregate": {"dice": dice}, "excluded": {}},
        ])
    board.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("evaluate/dice")] == [(1, 0.25), (2, 0.5)]
    assert [e.value for e in events.Scalars("train/site-a/loss")] == [1.0, 0.5]
    assert [e.value for e in events.Scalars("train/excluded-sites")] == [1.0, 1.0]
    assert "evaluate/site-a/hd95" not in events.Tags()["scalars"]  # non-numbers are skipped
