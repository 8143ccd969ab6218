"""3D segmentation with a MONAI UNet: transforms, DiceCE training, Dice/HD95 evaluation.

Evaluation runs sliding-window inference on whole volumes at the task spacing (RAS,
resampled), which is where the model works; metrics are therefore in task-spacing voxels
converted to mm for HD95.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from torch import nn

from data_prep.site_dataset import DatasetError, SiteDataset
from tasks.channels import normalization
from tasks.base import LocalTrainingOptions, Task, TrainResult, device
from tasks.data import SiteData, cached_site_data, seeded_generator
from tasks.training import train_dp, train_local

KEYS = ("image", "label")


def intensity_transform(modality, ct_window: tuple[float, float]):
    """Per channel: CT clipped to a HU window and scaled to [0, 1]; MR (and others) z-scored inside the body.

    ``modality`` is one channel's name (``CT``, ``MR``) or the names of all channels.
    """
    return normalization(modality, ct_window)


def image_item(case) -> str | list[str]:
    """What LoadImaged reads for a case: one file, or one file per channel (stacked as channels)."""
    return str(case.image) if len(case.images) == 1 else [str(p) for p in case.images]


def check_channels(dataset: SiteDataset, in_channels: int) -> None:
    """A site's image channels must match the model's ``in_channels``; the message says what to set."""
    if dataset.num_channels != in_channels:
        raise ValueError(
            f"{dataset.root}: dataset has {dataset.num_channels} channel(s) {list(dataset.channel_names)} but the "
            f"model takes {in_channels}; set --run-config 'in-channels={dataset.num_channels}'"
        )


def preprocessing(modality, spacing, ct_window, keys=KEYS) -> list:
    """Deterministic part of the chain (cached): load, channel-first, RAS, resample, normalise."""
    modes = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    return [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=spacing, mode=modes),
        intensity_transform(modality, ct_window),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ]


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
        return model

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
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandGaussianNoised("image", prob=0.2, std=0.03),
        ]
        train_items = [{"image": image_item(c), "label": str(c.label)} for c in dataset.training]
        test_items = [{"image": image_item(c), "label": str(c.label)} for c in dataset.test if c.label is not None]
        return cached_site_data(
            dataset, dataset.modality, train_items, test_items, Compose(train_chain),
            Compose(preprocessing(channels, s.spacing, s.ct_window)), s.spacing, s.cache_max_mb,
            channels=s.in_channels + 1,
        )

    def train(self, model: nn.Module, site_data: SiteData, options: LocalTrainingOptions) -> TrainResult:
        dev = device()
        model.to(dev)
        site_data.reseed(options.seed)

        def batches(epoch: int):
            loader = DataLoader(
                site_data.train, batch_size=self.settings.batch_size, shuffle=True, num_workers=0,
                generator=seeded_generator(options.seed * 1000 + epoch),
            )
            yield from loader

        def step_loss(net: nn.Module, batch: dict) -> torch.Tensor:
            return self.loss_fn(net(batch["image"].to(dev)), batch["label"].to(dev))

        if options.dp is not None:
            loss, steps, seconds = train_dp(options.dp, options.epochs, self.split_batch, self.per_sample_loss)
            return TrainResult(site_data.num_train_cases, loss, steps, seconds)
        lr = options.lr if options.lr is not None else self.settings.lr
        loss, steps, seconds, delta_c = train_local(model, batches, step_loss, options, self.settings.optimizer, lr)
        return TrainResult(site_data.num_train_cases, loss, steps, seconds, scaffold_delta=delta_c)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy per sample (DiceCELoss without batch reduction), for DP-SGD."""
        dice = self._dice_per_sample(outputs, targets).flatten(1).mean(1)
        ce = torch.nn.functional.cross_entropy(outputs, targets[:, 0].long(), reduction="none")
        return dice + ce.flatten(1).mean(1)

    @torch.no_grad()
    def predict_logits(self, model: nn.Module, image: torch.Tensor, dev: torch.device | None = None) -> torch.Tensor:
        """Sliding-window logits for a (B, C, X, Y, Z) image at task spacing (on ``dev``, default CUDA if present)."""
        model.eval()
        dev = dev or device()
        model.to(dev)
        return sliding_window_inference(
            image.to(dev), roi_size=self.settings.roi_size, sw_batch_size=4,
            predictor=model, overlap=self.settings.sw_overlap, mode="gaussian",
        )

    def evaluate(self, model: nn.Module, site_data: SiteData, split: str = "test") -> dict[str, float]:
        dataset = site_data.test if split == "test" else None
        if dataset is None or len(dataset) == 0:
            return {"num-examples": 0}
        model.to(device())
        # ignore_empty (MONAI's default): a class absent from a case's ground truth (a lesion-free
        # case) does not enter that class's mean; false positives there show up in HD95 and loss.
        dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        losses = []
        for item in DataLoader(dataset, batch_size=1, num_workers=0):
            logits = self.predict_logits(model, item["image"])
            label = item["label"].to(logits.device)
            losses.append(float(self.loss_fn(logits, label)))
            pred = one_hot(logits.argmax(dim=1, keepdim=True), self.num_classes)
            truth = one_hot(label.long(), self.num_classes)
            dice(pred, truth)
            hd95(pred, truth, spacing=list(self.settings.spacing))
        per_class = dice.aggregate().cpu().numpy()  # NaN for a class no test case contains
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
