"""Where fedimaging keeps things when no path is configured.

Flower runs the app from its installed bundle with the local SuperLink's working folder as
cwd, so relative paths land in surprising places: every default path is absolute, under
``FEDIMAGING_HOME`` (default ``~/fedimaging``).
"""

from __future__ import annotations

import os
from pathlib import Path


def fedimaging_home(override: str | os.PathLike | None = None) -> Path:
    """Return the absolute fedimaging home: ``override``, ``$FEDIMAGING_HOME`` or ``~/fedimaging``."""
    raw = override or os.environ.get("FEDIMAGING_HOME") or "~/fedimaging"
    return Path(raw).expanduser().resolve()


def demo_root(home: str | os.PathLike | None = None) -> Path:
    """Folder that caches the generated demo federation."""
    return fedimaging_home(home) / "demo"


def runs_root(home: str | os.PathLike | None = None) -> Path:
    """Folder holding one run directory per run."""
    return fedimaging_home(home) / "runs"


def site_state_root(home: str | os.PathLike | None = None) -> Path:
    """Folder holding per-site private state of simulated sites (privacy ledger, SCAFFOLD, FedBN)."""
    return fedimaging_home(home) / "site-state"
