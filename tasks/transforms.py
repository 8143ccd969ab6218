"""The deterministic preprocessing both tasks (and predict) share: load, RAS, resample, intensity.

Applied once per case and cached (``tasks.data``); the random augmentations of each task follow
it in the task's own module.
"""

from __future__ import annotations

import logging
import warnings

import torch
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Spacingd,
)

from tasks.channels import normalization

KEYS = ("image", "label")
# MONAI's labels for axcodes (its current default, given explicitly: the default is about to change)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def intensity_transform(modality, ct_window: tuple[float, float]):
    """Per channel: CT clipped to a HU window and scaled to [0, 1]; MR (and others) z-scored inside the body.

    ``modality`` is one channel's name (``CT``, ``MR``) or the names of all channels (``tasks.channels``).
    """
    return normalization(modality, ct_window)


def quiet_load_images(keys) -> LoadImaged:
    """MONAI's loader, without its notice that the optional GPU DICOM codec is missing.

    ``LoadImaged`` sets up every reader it knows, DICOM's GPU codec included, and each one
    warns when nvImageCodec is not installed; our inputs are NIfTI, so the notice says nothing.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
        return LoadImaged(keys, image_only=True)


def preprocessing(modality, spacing, ct_window, keys=KEYS) -> list:
    """Deterministic part of the chain (cached): load, channel-first, RAS, resample, normalise."""
    modes = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    return [
        quiet_load_images(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
        Spacingd(keys, pixdim=spacing, mode=modes),
        intensity_transform(modality, ct_window),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ]
