"""Site-private state that must survive a SuperNode restart: FedBN layers, SCAFFOLD variates.

Kept in two places, as DESIGN 4 asks: Flower's ``context.state`` (fast, run-scoped) and a
weights-only file under the site's ``state-dir`` (survives restarts). Files are keyed by the
run key the server sends (the run directory's name), so a resumed run finds its state and a
new run starts clean. SCAFFOLD variates are kept per round so that a round the server
re-sends after a crash starts from exactly the variate it started from the first time.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedimaging.io import atomic_path
from fedimaging.weights import load_tensors

_ROUND_FILE = re.compile(r"^(?P<kind>[a-z-]+)-round-(?P<round>\d{6})\.pt$")


class SiteStateStore:
    """Weights-only tensors of one site and run, on disk under ``state_dir/runs/<run_key>``."""

    def __init__(self, state_dir: Path, run_key: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_key):
            raise ValueError(f"run key {run_key!r} is not a safe folder name")
        self.root = Path(state_dir) / "runs" / run_key

    def save(self, kind: str, server_round: int, tensors: dict[str, torch.Tensor], keep: int = 2) -> None:
        """Store ``tensors`` as the state after ``server_round``; keep the last ``keep`` rounds."""
        target = self.root / f"{kind}-round-{server_round:06d}.pt"
        with atomic_path(target) as tmp:
            torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        for old in self._rounds(kind)[:-keep]:
            (self.root / f"{kind}-round-{old:06d}.pt").unlink(missing_ok=True)

    def load_before(self, kind: str, server_round: int) -> dict[str, torch.Tensor] | None:
        """The latest state saved after a round earlier than ``server_round``, or None."""
        earlier = [r for r in self._rounds(kind) if r < server_round]
        if not earlier:
            return None
        path = self.root / f"{kind}-round-{earlier[-1]:06d}.pt"
        return load_tensors(path)

    def _rounds(self, kind: str) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _ROUND_FILE.match(path.name)
            if match and match["kind"] == kind:
                found.append(int(match["round"]))
        return sorted(found)
