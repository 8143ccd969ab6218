"""3D case-level classification with a MONAI network: transforms, cross-entropy, AUC evaluation.

The network is run config ``classifier``: MONAI's DenseNet121 (default) or one of MONAI's 3D
ResNets (``resnet10``/``resnet18``/``resnet34``, the family of MedMNIST's 3D baselines), whose
channel widths scale with ``classifier-width`` (MONAI's ``widen_factor``), so that small volumes
train in minutes on a CPU; or ``shape-descriptors`` (``tasks.shape_descriptors``: fixed shape
descriptors of a mask and a linear head, the classifier for DP-SGD on mask inputs).

Each case (one volume, one class index) is reoriented to RAS, resampled to the task spacing,
normalised like segmentation, then centre padded/cropped to ``classification_size``: padding and
cropping (not resizing) keep millimetres the same at every site, so a lesion's size means the
same thing whatever the scanner. The field of view is ``classification_size * spacing`` mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.metrics import compute_roc_auc
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.nets.resnet import ResNetBlock, get_inplanes
from monai.transforms import (
    Compose,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
)
from torch import nn
from torch.nn import functional as F

from data_prep.site_dataset import DatasetError, SiteDataset
from tasks.base import LocalTrainingOptions, Task, TaskSettings, TrainResult, device
from tasks.data import SiteData, check_channels, prepare_site_data
from tasks.shape_descriptors import ShapeDescriptorClassifier
from tasks.training import train_round
from tasks.transforms import preprocessing

IMAGE = ("image",)
DENSENET121 = {"init_features": 64, "growth_rate": 32, "block_config": (6, 12, 24, 16)}
RESNETS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}  # blocks per stage, as MONAI's


class DPSafeResNetBlock(ResNetBlock):
    """MONAI's basic ResNet block without in-place operations (same layers and numbers).

    Opacus' per-sample gradient hooks forbid modifying a layer's output in place, which MONAI's
    block does (``out += residual``, in-place ReLU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + residual)


SHAPE_DESCRIPTORS = "shape-descriptors"  # tasks.shape_descriptors: fixed descriptors, trained linear head
CLASSIFIERS = ("densenet121", *RESNETS, SHAPE_DESCRIPTORS)


class FeatureStandardisation(nn.Module):
    """Each case's pooled feature vector shifted and scaled to mean 0, variance 1 across its features
    (LayerNorm without weights; run config ``classifier-feature-norm=layer``).

    Why: the pooled features of a fixed (frozen, e.g. random) encoder share a large common offset, so
    the linear head's per-case gradients point mostly along it; DP-SGD clips each case's gradient to a
    fixed norm and then spends it there, not on what tells the classes apart. Per case, so it mixes no
    cases (DP-SGD's per-sample gradients stay per sample) and keeps no statistics a site would share.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[1:])


def standardise_features(model: nn.Module) -> nn.Module:
    """Insert :class:`FeatureStandardisation` just before the final linear layer (no parameter renamed)."""
    if isinstance(model, ShapeDescriptorClassifier):
        model.descriptors = nn.Sequential(model.descriptors, FeatureStandardisation())
    elif isinstance(model, DenseNet121):
        model.class_layers.flatten = nn.Sequential(model.class_layers.flatten, FeatureStandardisation())
    else:
        model.avgpool = nn.Sequential(model.avgpool, FeatureStandardisation())
    return model


def build_classifier(name: str, in_channels: int, num_classes: int, width: float = 1.0,
                     architecture: dict[str, Any] | None = None,
                     spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> nn.Module:
    """The MONAI network called ``name`` (3D, untrained; nothing is downloaded), or the shape descriptors' head.

    ``width`` multiplies a ResNet's channels (1.0 = 64, 128, 256, 512); DenseNet121 has fixed
    widths (``architecture`` overrides its ``init_features``/``growth_rate``/``block_config``).
    ``spacing`` (mm) puts ``shape-descriptors`` in millimetres.
    """
    if name == SHAPE_DESCRIPTORS:
        if width != 1.0 or architecture:
            raise ValueError(f"{SHAPE_DESCRIPTORS} has no width or architecture to set (classifier-width 1.0), "
                             f"got width {width}")
        return ShapeDescriptorClassifier(in_channels, num_classes, spacing)
    if name == "densenet121":
        if width != 1.0:
            raise ValueError(f"classifier-width applies to the ResNets only; densenet121 needs 1.0, got {width}")
        return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                           **{**DENSENET121, **(architecture or {})})
    if name not in RESNETS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {name!r}")
    if architecture:
        raise ValueError(f"architecture overrides are for densenet121, not {name}")
    model = ResNet(DPSafeResNetBlock, RESNETS[name], get_inplanes(), spatial_dims=3, n_input_channels=in_channels,
                   num_classes=num_classes, widen_factor=width, act=("relu", {"inplace": False}))
    for module in model.modules():  # the blocks build their own (in-place) ReLU
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and AUC.

    AUC is MONAI's ROC AUC: of the positive-class probability for two classes, macro one-vs-rest
    otherwise; NaN when the cases hold a single class (AUC is undefined there).
    """
    labels = labels.astype(np.int64)
    predicted = probs.argmax(axis=1)
    present = np.unique(labels)
    recalls = [float(np.mean(predicted[labels == c] == c)) for c in present]
    if present.size < 2:
        auc = math.nan
    elif num_classes == 2:
        auc = float(compute_roc_auc(torch.as_tensor(probs[:, 1]), torch.as_tensor(labels)))
    else:
        onehot = np.eye(num_classes, dtype=np.float32)[labels]
        keep = [c for c in range(num_classes) if c in present]  # one-vs-rest needs both classes
        auc = float(compute_roc_auc(torch.as_tensor(probs[:, keep]), torch.as_tensor(onehot[:, keep])))
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced-accuracy": float(np.mean(recalls)),
        "auc": auc,
    }


class ClassificationTask(Task):
    """A MONAI 3D classifier (``settings.classifier``) predicting one class per case.

    ``architecture`` overrides DenseNet121's width/depth (``init_features``, ``growth_rate``,
    ``block_config``) for tests and quick CPU trials; the default is DenseNet121 itself.
    """

    name = "classification"
    best_metric = "auc"

    def __init__(
        self,
        settings: TaskSettings,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        architecture: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(settings)
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else None
        self.architecture = architecture

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.settings.seed)
        s = self.settings
        model = build_classifier(s.classifier, s.in_channels, self.num_classes, s.classifier_width, self.architecture,
                                 spacing=s.spacing)
        if self.settings.dp_compatible or s.classifier_norm == "group":
            from privacy.engine import make_dp_compatible  # BatchNorm -> GroupNorm, same everywhere

            model = make_dp_compatible(model)
        if s.classifier_feature_norm == "layer":
            model = standardise_features(model)
        return self._frozen(model)

    def encoder_names(self, model: nn.Module) -> frozenset[str]:
        """Everything but the final linear layer (DenseNet121's ``class_layers.out``, a ResNet's ``fc``)."""
        head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
        return frozenset(n for n in model.state_dict() if not n.startswith(head + "."))

    def inference_transform(self, modality) -> Compose:
        """Deterministic chain for one image: RAS, task spacing, intensity, pad/crop to size.

        ``modality``: one channel's name (``CT``/``MR``) or the names of all channels.
        """
        s = self.settings
        return Compose(
            preprocessing(modality, s.spacing, s.ct_window, keys=IMAGE)
            + [ResizeWithPadOrCropd(IMAGE, spatial_size=s.classification_size, mode="constant")]
        )

    def prepare_site(self, dataset: SiteDataset) -> SiteData:
        if dataset.kind != "classification":
            raise DatasetError(
                f"{dataset.root}: task 'classification' needs class indices, dataset has {dataset.kind} labels"
            )
        if max(dataset.labels.values()) >= self.num_classes or min(dataset.labels.values()) < 0:
            raise DatasetError(
                f"{dataset.root}: classes {dataset.labels} do not fit the model's {self.num_classes} outputs"
            )
        s = self.settings
        check_channels(dataset, s.in_channels)
        channels = dataset.channel_names or dataset.modality
        train_chain = list(self.inference_transform(channels).transforms) + [
            RandAffined(
                IMAGE, prob=0.5, rotate_range=(0.12, 0.12, 0.12), scale_range=(0.08, 0.08, 0.08),
                translate_range=(3, 3, 3), mode="bilinear", padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandGaussianNoised("image", prob=0.2, std=0.03),
        ]
        return prepare_site_data(dataset, s, Compose(train_chain), self.inference_transform(channels),
                                 label=int, channels=s.in_channels)

    def train(self, model: nn.Module, site_data: SiteData, options: LocalTrainingOptions) -> TrainResult:
        n, batch_size = len(site_data.train), self.settings.batch_size
        # A trailing batch of one case breaks BatchNorm at small sizes (1 value per channel).
        return train_round(self, model, site_data, options, drop_last=n > batch_size and n % batch_size == 1,
                           batch_loss=lambda logits, label: F.cross_entropy(logits, label.long()))

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per case, for DP-SGD."""
        return F.cross_entropy(outputs, targets.long().view(-1), reduction="none")

    @torch.no_grad()
    def predict_logits(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) for a (B, channels, X, Y, Z) preprocessed image batch."""
        model.eval()
        return model(image.to(next(model.parameters()).device)).float()

    def predict_proba(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, C) for a preprocessed image batch (``fedimaging predict``)."""
        return torch.softmax(self.predict_logits(model, image), dim=1)

    def evaluate(self, model: nn.Module, site_data: SiteData, split: str = "test") -> dict[str, float]:
        dataset = site_data.test if split == "test" else None
        if dataset is None or len(dataset) == 0:
            return {"num-examples": 0}
        model.to(device())
        logits, labels = [], []
        for batch in DataLoader(dataset, batch_size=self.settings.batch_size, num_workers=0):
            logits.append(self.predict_logits(model, batch["image"]).cpu())
            labels.append(batch["label"].long().cpu())
        z, y = torch.cat(logits), torch.cat(labels)
        probs = torch.softmax(z, dim=1).numpy()
        return {
            "num-examples": len(dataset),
            "loss": float(F.cross_entropy(z, y)),
            **classification_metrics(probs, y.numpy(), self.num_classes),
        }
