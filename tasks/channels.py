"""Intensity normalisation per channel: CT window for CT channels, z-score for the others.

nnU-Net's convention decides from the channel name: a channel named ``CT`` is clipped to the
HU window and scaled to [0, 1]; any other channel (T1, T2, FLAIR, ADC, MR, ...) is z-scored
over its non-zero voxels, each channel on its own. Single-kind images use MONAI's own
transforms; only a mixed CT + MR image needs :class:`ChannelNormalized`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Transform,
)


def channel_kinds(channel_names: str | Sequence[str]) -> tuple[str, ...]:
    """``CT`` or ``MR`` per channel (a bare string is one channel)."""
    names = (channel_names,) if isinstance(channel_names, str) else tuple(channel_names)
    return tuple("CT" if str(n).strip().upper() == "CT" else "MR" for n in names) or ("MR",)


class ChannelNormalize(Transform):
    """Channel-first image: CT channels to the window in [0, 1], other channels z-scored."""

    def __init__(self, kinds: Sequence[str], ct_window: tuple[float, float]) -> None:
        self.kinds = tuple(kinds)
        self.ct = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        self.mr = NormalizeIntensity(nonzero=True)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != len(self.kinds):
            raise ValueError(f"image has {img.shape[0]} channels, expected {len(self.kinds)} ({self.kinds})")
        parts = [(self.ct if kind == "CT" else self.mr)(img[c:c + 1]) for c, kind in enumerate(self.kinds)]
        return torch.cat(parts, dim=0)  # a MetaTensor stays one (MONAI handles torch.cat)


class ChannelNormalized(MapTransform):
    """Dictionary version of :class:`ChannelNormalize`."""

    def __init__(self, keys: KeysCollection, kinds: Sequence[str], ct_window: tuple[float, float]) -> None:
        super().__init__(keys)
        self.normalize = ChannelNormalize(kinds, ct_window)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d


def normalization(channel_names: str | Sequence[str], ct_window: tuple[float, float], key: str = "image"):
    """The dictionary transform that normalises ``key`` for these channels."""
    kinds = channel_kinds(channel_names)
    if all(k == "CT" for k in kinds):
        return ScaleIntensityRanged(key, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
    if all(k == "MR" for k in kinds):
        return NormalizeIntensityd(key, nonzero=True, channel_wise=True)
    return ChannelNormalized(key, kinds, ct_window)
