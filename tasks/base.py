"""The task interface: what the ClientApp, the ServerApp and strategies know about a task.

A task builds the model, prepares a site's data (cached across rounds), trains locally and
evaluates. It never sees Flower: settings arrive as a frozen :class:`TaskSettings`, model
weights as torch tensors keyed by state-dict name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from data_prep.site_dataset import SiteDataset
from tasks.freeze import apply_freeze, frozen_names


@dataclass(frozen=True)
class TaskSettings:
    """Everything a task needs, parsed once at the edge (``app.config``)."""

    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 4
    lr: float = 2e-3
    optimizer: str = "adam"
    crops_per_case: int = 2
    # RAS axes along which training crops are mirrored at random and predictions averaged over the
    # mirrored copies (nnU-Net's mirroring); () = neither. Only where the anatomy is symmetric.
    mirror_axes: tuple[int, ...] = ()
    ct_window: tuple[float, float] = (-150.0, 250.0)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1
    sw_overlap: float = 0.25
    cache_max_mb: int = 2048
    classification_size: tuple[int, int, int] = (64, 64, 64)
    classifier: str = "densenet121"  # tasks.classification.CLASSIFIERS
    classifier_width: float = 1.0  # ResNet channel multiplier (MONAI widen_factor)
    classifier_norm: str = "batch"  # "group": BatchNorm replaced by GroupNorm, as DP-SGD needs (also without DP)
    classifier_feature_norm: str = "none"  # "layer": per-case standardised features into the head
    dp_compatible: bool = False  # model built without BatchNorm (Opacus)
    in_channels: int = 1  # image channels (dataset.json channel_names); every site must agree
    seed: int = 42
    freeze: tuple[str, ...] = ()  # run config ``freeze``: name patterns kept fixed (tasks.freeze)


@dataclass
class TrainResult:
    """What a round of local training reports (all numeric: it may leave the site)."""

    num_examples: int  # number of training CASES (not batches, not crops)
    loss: float
    steps: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    scaffold_delta: dict[str, torch.Tensor] | None = None  # SCAFFOLD: change of the site variate


@dataclass
class LocalTrainingOptions:
    """Per-round knobs that strategies control (FedProx, SCAFFOLD) and the privacy hook."""

    epochs: int = 1
    lr: float | None = None
    seed: int = 0
    proximal_mu: float = 0.0
    # The point the proximal term pulls toward (Ditto: the received global model); None = the
    # model's weights at the start of the round (FedProx).
    proximal_anchor: dict[str, torch.Tensor] | None = None
    # SCAFFOLD: server and site control variates (same keys as trainable parameters).
    scaffold_server: dict[str, torch.Tensor] | None = None
    scaffold_site: dict[str, torch.Tensor] | None = None
    dp: Any = None  # privacy.DPSiteSession or None


class Task(ABC):
    """Interface implemented by ``segmentation`` and ``classification``."""

    name: str
    best_metric: str  # evaluate-phase metric used for best.pt (higher is better)

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model, identical at every site and at the server (seeded)."""

    def encoder_names(self, model: nn.Module) -> frozenset[str]:
        """State-dict names of the model's feature extractor (``freeze=encoder``)."""
        raise NotImplementedError(f"task {self.name!r} defines no encoder")

    def frozen_names(self, model: nn.Module) -> frozenset[str]:
        """State-dict names run config ``freeze`` keeps fixed (empty without it; see tasks.freeze)."""
        return frozen_names(model, self.settings.freeze, self.encoder_names)

    def _frozen(self, model: nn.Module) -> nn.Module:
        """``model`` with the ``freeze`` parameters fixed: what every ``build_model`` returns."""
        return apply_freeze(model, self.frozen_names(model))

    def local_param_names(self, model: nn.Module) -> frozenset[str]:
        """State-dict names that stay at the site under FedBN: normalisation layers."""
        norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        names = set()
        for module_name, module in model.named_modules():
            if isinstance(module, norm_types):
                for key in module.state_dict():
                    names.add(f"{module_name}.{key}" if module_name else key)
        return frozenset(names)

    @abstractmethod
    def prepare_site(self, dataset: SiteDataset) -> Any:
        """Build the site's cached training/evaluation data (called once per process)."""

    @abstractmethod
    def train(self, model: nn.Module, site_data: Any, options: LocalTrainingOptions) -> TrainResult:
        """Train ``model`` in place on the site's training cases."""

    @abstractmethod
    def evaluate(self, model: nn.Module, site_data: Any, split: str = "test") -> dict[str, float]:
        """Metrics of ``model`` on the site's ``split`` cases; includes ``num-examples``."""

    # --- DP-SGD (privacy.DPSiteSession drives the loop; see tasks.training.train_dp) -------------
    def dp_loader(self, site_data: Any) -> Any:
        """Plain loader over the training cases (one sample per case); Opacus replaces its sampling."""
        from monai.data import DataLoader, list_data_collate

        return DataLoader(site_data.train, batch_size=self.settings.batch_size, shuffle=False,
                          num_workers=0, collate_fn=list_data_collate)

    def split_batch(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """(inputs, targets) of a training batch, on the training device."""
        dev = device()
        return batch["image"].to(dev), batch["label"].to(dev)

    def per_sample_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The training loss with one value per sample (shape [B]); nothing may mix samples."""
        raise NotImplementedError(f"task {self.name!r} has no per-sample loss for DP-SGD")


def device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
