"""An in-process grid for app-level tests that keeps every message it sent and every reply."""

from __future__ import annotations

from bench.local_grid import LocalGrid


class CapturingGrid(LocalGrid):
    """``LocalGrid`` (the real ClientApp in process) that records ``sent`` and ``replies``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies
