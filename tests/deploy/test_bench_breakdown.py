"""bench.deploy's breakdown: parsed from the sites' timing lines, rounds 2..N, waiting by difference."""

from __future__ import annotations

import json

from bench.deploy import _per_round_summary, breakdown, timing_lines


def _line(**rec) -> str:
    return "INFO noise before\nfedimaging-timing " + json.dumps(rec)


def test_breakdown_splits_a_round_into_startup_work_and_waiting():
    log = "\n".join([
        _line(message="train", round=1, message_in_process=1, process_start_to_imports_s=1.0, imports_s=8.0,
              flower_to_handler_s=0.5, data_s=4.0, train_s=3.0, handler_s=7.5, cache_misses=6),
        _line(message="train", round=2, message_in_process=1, process_start_to_imports_s=1.0, imports_s=6.0,
              flower_to_handler_s=0.5, data_s=0.5, train_s=3.0, handler_s=3.6, cache_hits=6),
        _line(message="evaluate", round=2, message_in_process=1, process_start_to_imports_s=1.0, imports_s=6.0,
              flower_to_handler_s=0.5, data_s=0.3, evaluate_s=1.0, handler_s=1.4, cache_hits=2),
        "fedimaging-timing {not json",
    ])
    records = timing_lines(log)
    assert len(records) == 3
    result = breakdown(records, [30.0, 25.0])
    train = result["train"]
    assert train["startup_s"] == 7.5 and train["data_s"] == 0.5 and train["train_s"] == 3.0  # round 2 only
    assert (train["cache_hits"], train["cache_misses"], train["fresh_processes"]) == (6, 6, 2)
    assert result["evaluate"]["evaluate_s"] == 1.0
    # round 2: 25 s, of which the site was busy (7.5 + 3.6) + (7.5 + 1.4) = 20 s
    assert result["waiting_s_per_round"] == 5.0


def test_seconds_per_round_leaves_out_round_one():
    summary = _per_round_summary([40.0, 10.0, 14.0])
    assert summary["seconds_per_round"] == 12.0 and summary["first_round_seconds"] == 40.0
    assert _per_round_summary([9.0])["seconds_per_round"] == 9.0
