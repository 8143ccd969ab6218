"""Run config ``classifier=shape-descriptors``: fixed 3D shape descriptors and one trained linear layer.

For inputs that are masks (a segmentation, or a shape such as AdrenalMNIST3D's glands): each channel's
foreground is where the normalised image exceeds 0.5. Thirteen descriptors per channel, in the spirit
of radiomics' shape features, all computed in millimetres at the task spacing:

* log volume, log surface area (voxel faces), sphericity, volume / surface (a thickness);
* log of the three principal second moments (ascending), elongation and flatness (their root ratios);
* log of the volume left after 1, 2, 3 and 4 six-connected erosions (a granulometry: how much of the
  shape is thicker than 2, 4, 6, 8 voxels).

Why: nothing here is trained but the linear head (``13 x channels + 1`` values per class), so DP-SGD's
noise, which grows with the number of trained values, costs little; measured on AdrenalMNIST3D (README
"Real data") a linear model on these matches a trained 3D ResNet without DP. Untrained, so no data is
needed to build it and no weights are downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

FOREGROUND = 0.5
"""Threshold on the normalised image (a mask scaled to [0, 1] by the task's intensity step)."""
EROSIONS = 4
DESCRIPTORS_PER_CHANNEL = 9 + EROSIONS


def _cross() -> torch.Tensor:
    """The 3x3x3 six-neighbourhood (face neighbours and the centre) as a convolution kernel."""
    kernel = torch.zeros(1, 1, 3, 3, 3)
    kernel[0, 0, 1, 1, :] = kernel[0, 0, 1, :, 1] = kernel[0, 0, :, 1, 1] = 1
    return kernel


def empty_channels(image: torch.Tensor) -> list[int]:
    """The channels of one (C, X, Y, Z) normalised image with no foreground: their descriptors are all 0."""
    return [k for k in range(image.shape[0]) if not bool((image[k] > FOREGROUND).any())]


class ShapeDescriptors(nn.Module):
    """(B, C, X, Y, Z) images -> (B, C * 13) shape descriptors of each channel's foreground. No parameters."""

    def __init__(self, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise ValueError(f"spacing must be three numbers > 0 (mm), got {tuple(spacing)}")
        self.spacing = tuple(float(s) for s in spacing)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # eigvalsh: no half
        mask = (x.reshape(b * c, 1, *x.shape[2:]) > FOREGROUND).to(dtype)
        return self._describe(mask).reshape(b, c * DESCRIPTORS_PER_CHANNEL)

    def _describe(self, mask: torch.Tensor) -> torch.Tensor:
        sx, sy, sz = self.spacing
        voxel = sx * sy * sz
        count = mask.sum(dim=(1, 2, 3, 4))
        volume = count * voxel
        # faces between foreground and background (the zero padding outside the field counts as background)
        padded = F.pad(mask, (1, 1, 1, 1, 1, 1))
        face_areas = (sy * sz, sx * sz, sx * sy)
        area = sum(padded.diff(dim=2 + k).abs().sum(dim=(1, 2, 3, 4)) * face_areas[k] for k in range(3))
        grid = torch.stack(torch.meshgrid(
            *[torch.arange(n, dtype=mask.dtype, device=mask.device) * s for n, s in zip(mask.shape[2:], self.spacing)],
            indexing="ij"))  # (3, X, Y, Z) in mm
        weights = mask[:, 0]
        n = count.clamp_min(1)
        centroid = torch.einsum("bxyz,ixyz->bi", weights, grid) / n[:, None]
        offsets = grid[None] - centroid[:, :, None, None, None]  # (B, 3, X, Y, Z)
        moments = torch.einsum("bixyz,bjxyz,bxyz->bij", offsets, offsets, weights) / n[:, None, None]
        principal = torch.linalg.eigvalsh(moments).clamp_min(0)  # ascending, mm^2
        tiny = 1e-6
        sphericity = math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area.clamp_min(tiny)
        ratios = [(principal[:, k] / principal[:, 2].clamp_min(tiny)).sqrt() for k in (1, 0)]  # 0 when empty
        eroded, kernel = [], _cross().to(mask)
        current = mask
        for _ in range(EROSIONS):
            current = (F.conv3d(current, kernel, padding=1) > 6.5).to(mask.dtype)
            eroded.append(torch.log1p(current.sum(dim=(1, 2, 3, 4)) * voxel))
        return torch.stack([
            torch.log1p(volume), torch.log1p(area), sphericity, volume / area.clamp_min(tiny),
            *torch.log1p(principal).unbind(1), *ratios, *eroded,
        ], dim=1)


class ShapeDescriptorClassifier(nn.Module):
    """:class:`ShapeDescriptors` into one linear layer ``fc`` (the only trained values)."""

    def __init__(self, in_channels: int, num_classes: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.descriptors = ShapeDescriptors(spacing)
        self.fc = nn.Linear(in_channels * DESCRIPTORS_PER_CHANNEL, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.descriptors(x).to(self.fc.weight.dtype))

    def input_warnings(self, image: torch.Tensor) -> list[str]:
        """For ``fedimaging predict``: each channel of one (C, X, Y, Z) image that gives the model nothing."""
        return [f"channel {k} has no foreground (no voxel above {FOREGROUND} after normalisation): its shape "
                "descriptors are all 0, so the probabilities are the model's bias alone; is the input a mask, "
                "and is --modality right?" for k in empty_channels(image)]
