"""3D segmentation with a MONAI UNet: augmentation, DiceCE training, Dice/HD95 evaluation.

Evaluation runs sliding-window inference on whole volumes at the task spacing (RAS,
resampled), which is where the model works; metrics are therefore in task-spacing voxels
converted to mm for HD95.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import torch
from monai.data import DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from torch import nn

from data_prep.site_dataset import DatasetError, SiteDataset
from tasks.base import LocalTrainingOptions, Task, TrainResult, device
from tasks.data import SiteData, check_channels, prepare_site_data
from tasks.training import train_round
from tasks.transforms import KEYS, preprocessing  # noqa: F401 - preprocessing: also predict's import

class SegmentationTask(Task):
    """MONAI UNet segmentation of the dataset's labels (background + foreground classes)."""

    name = "segmentation"
    best_metric = "dice"

    def __init__(self, settings, num_classes: int = 3) -> None:
        super().__init__(settings)
        self.num_classes = num_classes
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self._dice_per_sample = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.settings.seed)
        s = self.settings
        strides = tuple(2 for _ in range(len(s.channels) - 1))
        model = UNet(
            spatial_dims=3,
            in_channels=s.in_channels,
            out_channels=self.num_classes,
            channels=s.channels,
            strides=strides,
            num_res_units=s.num_res_units,
            norm=("instance", {"affine": True}),
        )
        return self._frozen(model)

    def encoder_names(self, model: nn.Module) -> frozenset[str]:
        """The UNet's down path and bottom block: MONAI nests ``Sequential(down, SkipConnection(inner), up)``
        per level, so the encoder is every level's ``down`` plus the innermost block."""
        prefixes, path, level = [], "model", model.model
        while isinstance(level, nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
            prefixes.append(f"{path}.0")
            path, level = f"{path}.1.submodule", level[1].submodule
        prefixes.append(path)
        return frozenset(n for n in model.state_dict() if any(n.startswith(p + ".") for p in prefixes))

    def prepare_site(self, dataset: SiteDataset) -> SiteData:
        if dataset.kind != "segmentation":
            raise DatasetError(f"{dataset.root}: task 'segmentation' needs label maps, dataset has {dataset.kind} labels")
        if max(dataset.labels.values()) >= self.num_classes:
            raise DatasetError(
                f"{dataset.root}: labels {dataset.labels} need more than the model's {self.num_classes} classes"
            )
        s = self.settings
        check_channels(dataset, s.in_channels)
        channels = dataset.channel_names or dataset.modality
        train_chain = preprocessing(channels, s.spacing, s.ct_window) + [
            SpatialPadd(KEYS, spatial_size=s.roi_size),
            RandCropByPosNegLabeld(
                KEYS, label_key="label", spatial_size=s.roi_size, pos=1, neg=1,
                num_samples=s.crops_per_case, image_key="image", image_threshold=0.0,
            ),
            *(RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in s.mirror_axes),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandGaussianNoised("image", prob=0.2, std=0.03),
        ]
        return prepare_site_data(dataset, s, Compose(train_chain), Compose(preprocessing(channels, s.spacing, s.ct_window)),
                                 label=str, channels=s.in_channels + 1)

    def train(self, model: nn.Module, site_data: SiteData, options: LocalTrainingOptions) -> TrainResult:
        return train_round(self, model, site_data, options, batch_loss=self.loss_fn)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy per sample (DiceCELoss without batch reduction), for DP-SGD."""
        dice = self._dice_per_sample(outputs, targets).flatten(1).mean(1)
        ce = torch.nn.functional.cross_entropy(outputs, targets[:, 0].long(), reduction="none")
        return dice + ce.flatten(1).mean(1)

    @torch.no_grad()
    def predict_logits(self, model: nn.Module, image: torch.Tensor, dev: torch.device | None = None) -> torch.Tensor:
        """Sliding-window logits for a (B, C, X, Y, Z) image at task spacing (on ``dev``, default CUDA if present).

        With ``mirror-axes`` the image is also predicted mirrored along every combination of those
        axes (test-time mirroring, as nnU-Net does); the result is then the log of the mean softmax
        over the copies, which are logits whose softmax is that mean."""
        model.eval()
        dev = dev or device()
        model.to(dev)
        image = image.to(dev)
        if not self.settings.mirror_axes:
            return self._sliding_window(model, image)
        copies = mirror_flips(self.settings.mirror_axes)
        probabilities = sum(torch.softmax(self._sliding_window(model, image.flip(flip)), dim=1).flip(flip)
                            for flip in copies) / len(copies)
        return torch.log(probabilities.clamp_min(1e-12))

    def _sliding_window(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(
            image, roi_size=self.settings.roi_size, sw_batch_size=4,
            predictor=model, overlap=self.settings.sw_overlap, mode="gaussian",
        )

    def evaluate(self, model: nn.Module, site_data: SiteData, split: str = "test") -> dict[str, float]:
        dataset = site_data.test if split == "test" else None
        if dataset is None or len(dataset) == 0:
            return {"num-examples": 0}
        model.to(device())
        # ignore_empty (MONAI's default): a class absent from a case's ground truth (a lesion-free
        # case) does not enter that class's mean; false positives there show up in HD95 and loss.
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)  # per case, see below
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        losses = []
        for item in DataLoader(dataset, batch_size=1, num_workers=0):
            logits = self.predict_logits(model, item["image"])
            label = item["label"].to(logits.device)
            losses.append(float(self.loss_fn(logits, label)))
            pred = one_hot(logits.argmax(dim=1, keepdim=True), self.num_classes)
            truth = one_hot(label.long(), self.num_classes)
            dice(pred, truth)
            with warnings.catch_warnings():
                # A class absent from prediction or truth gives inf/NaN, which is skipped below;
                # MONAI also warns about its own internal use of a deprecated argument.
                warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class \d+ is all 0")
                warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
                hd95(pred, truth, spacing=list(self.settings.spacing))
        per_class = _mean_over_cases(dice.get_buffer().cpu().numpy())  # NaN for a class no test case contains
        distances = hd95.aggregate().cpu().numpy()
        finite = distances[np.isfinite(distances)]
        metrics = {
            "num-examples": len(dataset),
            "loss": float(np.mean(losses)),
            "dice": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else math.nan,
            "hd95": float(np.mean(finite)) if finite.size else math.nan,
        }
        for index, value in enumerate(per_class, start=1):
            metrics[f"dice-class{index}"] = float(value)
        return metrics


def mirror_flips(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The tensor dims of a (B, C, X, Y, Z) batch to flip for each test-time mirrored copy: every
    combination of ``mirror_axes``, the unflipped image (``()``) first."""
    dims = [axis + 2 for axis in mirror_axes]
    return [c for n in range(len(dims) + 1) for c in itertools.combinations(dims, n)]


def _mean_over_cases(per_case: np.ndarray) -> np.ndarray:
    """Each class's mean Dice over the cases whose ground truth contains it; NaN if none does.

    Not ``DiceMetric.aggregate()``: MONAI's reduction turns a class that is NaN in every case (no
    test case contains it, e.g. a site whose test cases are all lesion-free) into 0.0, which
    scored such a site's lesion Dice as 0 and halved its mean Dice."""
    present = np.isfinite(per_case)
    counts = present.sum(axis=0)
    sums = np.where(present, per_case, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

