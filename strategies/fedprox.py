"""FedProx (Li et al. 2020): FedAvg on the server; the sites add (mu/2)||w - w_global||^2 locally."""

from __future__ import annotations

from flwr.app import ConfigRecord

from .base import FedImagingFedAvg


class FedImagingFedProx(FedImagingFedAvg):
    """Sends ``proximal-mu`` in every train config; aggregation is FedAvg's."""

    def round_train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        config["proximal-mu"] = float(self.settings.proximal_mu)
        return config
