"""A Grid that pulls replies sooner than Flower's fixed 3 s, for the strategy loop.

Flower 1.41's ``HttpGrid.send_and_receive`` sleeps 3 s between pulls, so every phase of every
round ends on average 1.5 s (at worst 3 s) after its last reply arrived. The ServerApp and the
SuperLink talk over the local ServerAppIo API, where a pull is cheap: this wrapper pulls after
``first`` seconds and backs off to ``longest`` (reset at every call), so short phases end at once
and long ones cost a pull per second at most. Everything else is delegated to Flower's Grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """``grid`` with ``send_and_receive`` polling every ``first``..``longest`` seconds."""

    def __init__(self, grid: Grid, first: float = 0.05, longest: float = 1.0, growth: float = 1.5) -> None:
        self.inner = grid
        self.first, self.longest, self.growth = first, longest, growth
        self.pulls = 0

    # --- delegated -------------------------------------------------------------------------------
    def set_run(self, run):  # noqa: ANN001, D102
        return self.inner.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    # --- faster polling --------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply arrived or ``timeout`` passed (Flower's contract)."""
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        pause = self.first
        while timeout is None or time.monotonic() < end:
            found = list(self.pull_messages(pending))
            self.pulls += 1
            replies.extend(found)
            pending.difference_update(m.metadata.reply_to_message_id for m in found)
            if not pending:
                break
            if timeout is not None:
                pause = min(pause, max(0.0, end - time.monotonic()))
            time.sleep(pause)
            pause = min(self.longest, pause * self.growth)
        return replies


def faster_polling(grid: Grid) -> Grid:
    """Wrap Flower's network grids; in-process grids (simulation, benchmarks) answer at once already."""
    if type(grid).__name__ == "HttpGrid":  # flwr.superlink.grid.http_grid (deployment and `flwr run`)
        return PollingGrid(grid)
    return grid
