"""PollingGrid: replies are collected as soon as they arrive, Flower's timeout contract is kept."""

from __future__ import annotations

import time
from types import SimpleNamespace

from app.polling_grid import PollingGrid, faster_polling


class _SlowGrid:
    """Replies to message ``i`` become available ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        self.delays = delays
        self.pushed_at = None

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in ids if now >= self.delays[int(i)]]

    def get_node_ids(self):
        return [1, 2]


def test_replies_are_collected_within_a_fraction_of_flowers_three_seconds():
    grid = PollingGrid(_SlowGrid([0.0, 0.3]))
    start = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=10))
    elapsed = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1"]
    assert elapsed < 0.3 + 0.5  # Flower's HttpGrid would take 3 s here (one sleep of 3 s)


def test_timeout_is_kept_and_late_replies_are_left_out():
    grid = PollingGrid(_SlowGrid([0.0, 60.0]))
    start = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=0.5))
    assert 0.45 <= time.monotonic() - start < 1.2
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]


def test_polling_backs_off_to_at_most_one_pull_per_second():
    grid = PollingGrid(_SlowGrid([0.0, 4.0]))
    list(grid.send_and_receive(["a", "b"], timeout=10))
    assert grid.pulls <= 4 / 1.0 + 10  # ~9 fast pulls to reach 1 s, then one per second


def test_only_flowers_network_grid_is_wrapped():
    class HttpGrid(_SlowGrid):
        pass

    assert isinstance(faster_polling(HttpGrid([0])), PollingGrid)
    plain = _SlowGrid([0])
    assert faster_polling(plain) is plain
    assert PollingGrid(HttpGrid([0])).get_node_ids() == [1, 2]
