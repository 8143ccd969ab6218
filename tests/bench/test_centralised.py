"""The benchmarks' pooled and local-only arms train on the federated arms' schedule."""

from __future__ import annotations

import math

import pytest

from app.config import parse_run_config, strategy_settings
from bench.demo_study import train_centralised


class _RecordingTask:
    def __init__(self) -> None:
        self.calls = []

    def train(self, model, data, options):
        self.calls.append(options)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_centralised_training_follows_the_rounds_learning_rates(schedule):
    run = parse_run_config({"num-server-rounds": 6, "local-epochs": 3, "lr": 0.004, "lr-schedule": schedule})
    task = _RecordingTask()
    train_centralised(task, model=None, data=None, run=run, seed=5)
    sites = strategy_settings(run, "dice", 3)  # what the server sends the sites each round
    assert [c.lr for c in task.calls] == pytest.approx([sites.round_lr(r) for r in range(1, 7)])
    assert all(c.epochs == 3 for c in task.calls)  # 6 x 3 = the federated arms' 18 epochs
    assert len({c.seed for c in task.calls}) == 6  # each round shuffles its own way
    if schedule == "cosine":  # from lr down to a tenth of it, independently of round_lr
        assert task.calls[0].lr == pytest.approx(0.004) and task.calls[-1].lr == pytest.approx(0.0004)
        assert task.calls[2].lr == pytest.approx(0.004 * (0.1 + 0.45 * (1 + math.cos(math.pi * 2 / 5))))
    else:
        assert {c.lr for c in task.calls} == {0.004}
