"""FedAdam / FedYogi (Reddi et al. 2021): a server optimizer on the averaged update.

The moments are server state (checkpointed with the run). The maths is ``aggregation.adam_step``,
checked against Flower's built-in FedAdam/FedYogi in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping

from .aggregation import Arrays, adam_step, weighted_mean
from .base import FedImagingFedAvg
from .records import SiteUpdate


class FedImagingFedAdam(FedImagingFedAvg):
    """Adam on the case-weighted mean update; ``server_lr`` is its step size (eta)."""

    yogi = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def aggregate_arrays(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        s = self.settings
        mean = weighted_mean([u.arrays for u in updates], [u.weight for u in updates])
        new, self.m, self.v = adam_step(
            current, mean, self.m, self.v, server_round=server_round, eta=s.effective_server_lr,
            beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, yogi=self.yogi,
        )
        return new

    def server_state_arrays(self) -> dict[str, Arrays]:
        if self.m is None or self.v is None:
            return {}
        return {"opt-m": self.m, "opt-v": self.v}

    def restore_server_state_arrays(self, arrays: Mapping[str, Arrays]) -> None:
        self.m = dict(arrays["opt-m"]) if "opt-m" in arrays else None
        self.v = dict(arrays["opt-v"]) if "opt-v" in arrays else None


class FedImagingFedYogi(FedImagingFedAdam):
    """Yogi's additive second-moment update (less aggressive than Adam's on rare large steps)."""

    yogi = True
