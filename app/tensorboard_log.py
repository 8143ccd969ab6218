"""Optional TensorBoard event files per run (run config ``tensorboard=true``).

Written from the same ``metrics.jsonl`` records as the console table, after each round:
aggregate metrics as ``<phase>/<metric>`` and per-site metrics as ``<phase>/<site>/<metric>``,
under ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class TensorBoardLog:
    """Scalars of each round's records; the writer is created lazily and flushed every round."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional extra
            raise RuntimeError(
                "tensorboard=true needs the tensorboard package: pip install -e \".[tensorboard]\""
            ) from exc
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_round(self, server_round: int, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            phase = record.get("phase", "round")
            for key, value in (record.get("aggregate") or {}).items():
                self._scalar(f"{phase}/{key}", value, server_round)
            for site, metrics in (record.get("sites") or {}).items():
                for key, value in metrics.items():
                    self._scalar(f"{phase}/{site}/{key}", value, server_round)
            self._scalar(f"{phase}/seconds", record.get("seconds"), server_round)
            self._scalar(f"{phase}/excluded-sites", len(record.get("excluded") or {}), server_round)
        self.writer.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.close()
