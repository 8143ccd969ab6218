"""FedBN (Li et al. 2021): normalisation layers stay at each site, never sent nor aggregated.

Which parameters are site-local is chosen by name by the task (``local_param_names``). The
server keeps its copy of those entries untouched (the initial values), so ``final_model.pt``
still loads into the task's model; each site uses its own local layers (site state).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .base import FedImagingFedAvg


class FedImagingFedBN(FedImagingFedAvg):
    """FedAvg over the shared (non site-local) parameters only."""

    def shared_keys(self, arrays: Mapping[str, np.ndarray]) -> list[str]:
        return [k for k in arrays if k not in self.local_param_names]
