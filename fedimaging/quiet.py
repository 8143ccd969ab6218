"""Keep libraries from reconfiguring the process's logging on import.

Opacus calls ``logging.basicConfig`` when it is imported, which adds a timestamped handler to
the root logger: every Flower log line then appears twice (Flower's coloured one, and the
root's copy). Importing such a library inside :func:`root_logging_kept` leaves the root logger
as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def root_logging_kept() -> Iterator[None]:
    """Undo handlers (and a level change) added to the root logger inside the block."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
