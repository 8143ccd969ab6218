"""Hooks a wrapper adds to a strategy instance without changing its class (central DP uses them).

A strategy calls each of its ``extensions`` at fixed points of a round; every hook has a no-op
default here, so the base strategy has no branch for any one wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .records import Arrays, SiteUpdate


class StrategyExtension:
    """No-op hooks; a wrapper overrides the ones it needs."""

    #: top-level key of this extension's JSON in the server state
    state_key = ""

    def check_model(self, arrays: Mapping[str, Any]) -> None:
        """Refuse (raise ValueError) a model the extension cannot handle, before the first round."""

    def check_update(self, sent: Arrays, update: SiteUpdate) -> str | None:
        """A reason to exclude an otherwise valid train update, or None."""
        return None

    def aggregate(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays | None:
        """New shared arrays instead of the strategy's own aggregation, or None to keep it."""
        return None

    def train_line(self, server_round: int, released: bool) -> dict[str, Any]:
        """Extra entries for the round's ``metrics.jsonl`` train line."""
        return {}

    def state(self) -> dict[str, Any]:
        """JSON state saved with the server state under :attr:`state_key`."""
        return {}

    def restore(self, state: Mapping[str, Any] | None, root: str) -> None:
        """Inverse of :meth:`state`; ``state`` is None when the saved run had no such extension."""
