"""What a strategy passes around: numpy views of ArrayRecords and the replies it accepted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from .aggregation import Arrays


@dataclass
class SiteUpdate:
    """One accepted reply: who sent it, its arrays, its weight (cases) and the full content."""

    site: str
    node_id: int
    arrays: Arrays
    weight: float
    content: RecordDict


@dataclass
class ScreenResult:
    """Outcome of screening one phase's replies."""

    accepted: list[SiteUpdate] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def to_numpy(record: ArrayRecord) -> Arrays:
    """ArrayRecord -> dict of numpy arrays (order kept)."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """dict of numpy arrays -> ArrayRecord (order kept)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
