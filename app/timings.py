"""Where a site's message time goes: process start and imports, data, training, evaluation.

Only when ``FEDIMAGING_TIMINGS=1`` is in the site's environment (``bench.deploy`` sets it): the
ClientApp then prints one ``fedimaging-timing {json}`` line per message to its log (stderr). The
line holds durations and cache counters only, stays in the site's log and is never sent.
Import this module first in the ClientApp: its import time marks when our imports began.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any

IMPORTS_BEGAN = time.time()
ENABLED = os.environ.get("FEDIMAGING_TIMINGS", "") == "1"
_imports_done: float | None = None
_messages = 0


def _process_started() -> float | None:
    """Wall-clock start of this process (Linux ``/proc``), or None elsewhere."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + int(fields[19]) / ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


PROCESS_STARTED = _process_started()


def imports_done() -> None:
    """Called at the end of the ClientApp module's imports."""
    global _imports_done
    _imports_done = time.time()


class MessageTiming:
    """Seconds per section of one message, plus counters; printed by :meth:`emit`."""

    def __init__(self, message: str, server_round: int) -> None:
        global _messages
        _messages += 1
        self.began = time.time()
        from tasks.cache import STATS  # this message's disk-cache hits, misses and seconds

        self._cache, self._cache_before = STATS, dict(STATS)
        self.record: dict[str, Any] = {"message": message, "round": server_round, "pid": os.getpid(),
                                       "message_in_process": _messages}
        if _messages == 1 and PROCESS_STARTED is not None:  # the first message of a fresh process
            self.record["process_start_to_imports_s"] = round(IMPORTS_BEGAN - PROCESS_STARTED, 3)
            if _imports_done is not None:
                self.record["imports_s"] = round(_imports_done - IMPORTS_BEGAN, 3)
                self.record["flower_to_handler_s"] = round(self.began - _imports_done, 3)

    @contextmanager
    def section(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"{name}_s"
            self.record[key] = round(self.record.get(key, 0.0) + time.perf_counter() - t0, 3)

    def count(self, **values: float) -> None:
        self.record.update(values)

    def emit(self) -> None:
        if ENABLED:
            self.record["handler_s"] = round(time.time() - self.began, 3)
            now, before = self._cache, self._cache_before
            self.record.update(cache_hits=now["hits"] - before["hits"], cache_misses=now["misses"] - before["misses"],
                               cache_io_s=round(now["seconds"] - before["seconds"], 3))
            print("fedimaging-timing " + json.dumps(self.record, sort_keys=True), file=sys.stderr, flush=True)
