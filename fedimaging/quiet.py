"""Keep libraries from reconfiguring the process's logging on import, and quiet their notices.

Opacus calls ``logging.basicConfig`` when it is imported, which adds a timestamped handler to
the root logger: every Flower log line then appears twice (Flower's coloured one, and the
root's copy). Importing such a library inside :func:`root_logging_kept` leaves the root logger
as it was. :func:`silence_library_notices` ignores the few library warnings that tell a user
nothing (matched one by one, see :data:`LIBRARY_NOTICES`).
"""

from __future__ import annotations

import logging
import warnings
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


# Library notices that tell a fedimaging user nothing, each matched by its text, category and the
# module that emits it (never a blanket ignore: warnings about the user's data stay visible).
LIBRARY_NOTICES = (
    # ray.init (the Flower simulation starts Ray): a tip about a future Ray default for GPU
    # visibility that the simulation's settings decide, not the user.
    (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator",
     r"ray\._private\.worker"),
)


def silence_library_notices() -> None:
    """Ignore the :data:`LIBRARY_NOTICES` in this process (idempotent: ``warnings`` drops duplicates)."""
    for category, message, module in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
