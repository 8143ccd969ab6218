"""Deterministic site sampling from the run seed (Flower's samplers use the global ``random``).

The sampler owns its ``random.Random``; its state is saved with the server state, so a resumed
run samples the same sites as an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log


class SiteSampler:
    """Picks the sites of a round: known sites ordered by name, then a seeded sample."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def sample(self, grid: Grid, fraction: float, min_nodes: int, min_available: int,
               node_sites: Mapping[int, str], excluded_sites: Mapping[str, str] | None = None) -> tuple[list[int], int]:
        """(sampled node ids, number of eligible nodes); waits until ``min_available`` nodes joined.

        ``excluded_sites`` (training only) are never sampled again (e.g. an exhausted privacy budget).
        """
        if fraction == 0.0:
            return [], 0
        waited = 0
        while len(all_nodes := sorted(int(n) for n in grid.get_node_ids())) < min_available:
            if waited % 30 == 0:
                log(INFO, "Waiting for sites: %d connected, %d required", len(all_nodes), min_available)
            time.sleep(1)
            waited += 1
        # known sites by name (stable across restarts), nodes not heard from yet by id
        all_nodes.sort(key=lambda n: (n not in node_sites, node_sites.get(n, ""), n))
        eligible = all_nodes
        if excluded_sites is not None:
            eligible = [n for n in all_nodes if node_sites.get(n) not in excluded_sites]
        if not eligible:
            return [], len(eligible)
        size = min(len(eligible), max(int(len(eligible) * fraction), min_nodes))
        picked = set(self.rng.sample(eligible, size))
        return [n for n in eligible if n in picked], len(eligible)

    def state(self) -> dict[str, Any]:
        """The RNG state as JSON."""
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state`."""
        self.rng.setstate((int(state["version"]), tuple(int(x) for x in state["internal"]), state["gauss"]))
