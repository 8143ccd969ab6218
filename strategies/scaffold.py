"""SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift.

The server sends its variate ``c`` as ArrayRecord ``scaffold-c`` (same keys as ``arrays``); each
site trains with gradient ``g - c_i + c``, updates ``c_i+ = c_i - c + (x - y_i) / (K lr)`` and
replies ``scaffold-delta-c`` = ``c_i+ - c_i`` (for all keys, or only the trainable parameters:
absent keys count as zero). The server sets ``x += lr_g * mean(y_i - x)`` and
``c += (|S| / N) * mean(delta_c_i)`` (``aggregation.scaffold_step``; means case-weighted, N the
sites eligible for training). ``c`` is server state, checkpointed with the run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from . import validation
from .aggregation import Arrays, scaffold_step, weighted_mean
from .base import FedImagingFedAvg
from .records import SiteUpdate, to_numpy, to_record

CONTROL_KEY = "scaffold-c"
DELTA_KEY = "scaffold-delta-c"


class FedImagingScaffold(FedImagingFedAvg):
    """FedAvg plus the server control variate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.control: Arrays | None = None

    def train_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        if self.control is None or set(self.control) != set(self._sent):
            self.control = {k: np.zeros_like(v) for k, v in self._sent.items()}
        content = super().train_content(server_round, arrays, config)
        content[CONTROL_KEY] = to_record(self.control)
        return content

    def check_extra(self, content: RecordDict) -> str | None:
        if DELTA_KEY not in content.array_records:
            return f"reply has no '{DELTA_KEY}' ArrayRecord"
        # sites may report only their trainable parameters; other keys count as no change
        delta = to_numpy(content.array_records[DELTA_KEY])
        return validation.check_arrays(self._sent, delta, DELTA_KEY, allow_missing=True)

    def aggregate_arrays(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        weights = [u.weight for u in updates]
        mean = weighted_mean([u.arrays for u in updates], weights)
        deltas = []
        for u in updates:
            reported = to_numpy(u.content.array_records[DELTA_KEY])
            deltas.append({k: reported.get(k, np.zeros_like(v)) for k, v in current.items()})
        mean_dc = weighted_mean(deltas, weights)
        mean_dc = {k: v.astype(np.float64) for k, v in mean_dc.items()}
        assert self.control is not None
        new, self.control = scaffold_step(
            current, mean, self.control, mean_dc, server_lr=self.settings.effective_server_lr,
            num_sampled=len(updates), num_total=max(self.train_population, len(updates)),
        )
        return new

    def server_state_arrays(self) -> dict[str, Arrays]:
        return {} if self.control is None else {CONTROL_KEY: self.control}

    def restore_server_state_arrays(self, arrays: Mapping[str, Arrays]) -> None:
        self.control = dict(arrays[CONTROL_KEY]) if CONTROL_KEY in arrays else None
