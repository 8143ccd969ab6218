"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al. 2018).

Unweighted across sites, like Flower's FedMedian/FedTrimmedAvg: one poisoned site cannot pull
the result far, whatever its case count claims.
"""

from __future__ import annotations

from .aggregation import Arrays, coordinate_median, server_step, trimmed_mean
from .base import FedImagingFedAvg
from .records import SiteUpdate


class FedImagingFedMedian(FedImagingFedAvg):
    """Element-wise median of the site models."""

    def aggregate_arrays(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        median = coordinate_median([u.arrays for u in updates])
        return server_step(current, median, self.settings.effective_server_lr)


class FedImagingFedTrimmedAvg(FedImagingFedAvg):
    """Element-wise mean after dropping ``trim_fraction`` of the sites from each tail."""

    def aggregate_arrays(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        mean = trimmed_mean([u.arrays for u in updates], self.settings.trim_fraction)
        return server_step(current, mean, self.settings.effective_server_lr)
