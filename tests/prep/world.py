"""Compare volumes in world (scanner) coordinates, whatever grid or field of view each tool chose.

Two converters may both be right and still write different arrays: another field of view, another
axis order or flip, another origin. What must agree is the value at each physical point. These
helpers sample one volume at the other's voxel centres through both affines (linear interpolation)
and compare only where both volumes hold acquired data.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

LPS_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS for points (x and y negated)


def _load(img) -> nib.Nifti1Image:
    return img if isinstance(img, nib.spatialimages.SpatialImage) else nib.load(str(img))


def voxel_indices(shape) -> np.ndarray:
    """(N, 3) integer indices of every voxel of a 3D grid, in C order."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1).reshape(-1, 3)


def voxel_world(affine: np.ndarray, shape) -> np.ndarray:
    """(N, 3) RAS mm of every voxel centre, in C order (matches ``data.reshape(-1)``)."""
    idx = voxel_indices(shape)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def world_to_index(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of RAS points."""
    inv = np.linalg.inv(affine)
    return points @ inv[:3, :3].T + inv[:3, 3]


def inside_grid(affine: np.ndarray, shape, points: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Which RAS points lie within the grid spanned by the voxel centres (interpolation possible)."""
    idx = world_to_index(affine, points)
    return np.all((idx >= -tol) & (idx <= np.asarray(shape[:3]) - 1 + tol), axis=1)


def sample(data: np.ndarray, affine: np.ndarray, points: np.ndarray,
           defined: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Values of a volume at RAS points (linear), and where they are defined.

    A point is defined when it lies inside the grid and every voxel its interpolation uses is
    marked in ``defined`` (all voxels when None), so fill voxels never leak into a comparison.
    """
    idx = world_to_index(affine, points)
    shape = np.asarray(data.shape[:3])
    idx_c = np.clip(idx, 0, shape - 1)  # snaps points within tolerance of the border
    ok = inside_grid(affine, data.shape, points)
    values = ndimage.map_coordinates(np.asarray(data, dtype=np.float64), idx_c.T, order=1, mode="nearest")
    if defined is not None:
        weight = ndimage.map_coordinates(defined.astype(np.float64), idx_c.T, order=1, mode="nearest")
        ok &= weight > 1 - 1e-6
    return values, ok


@dataclass
class WorldComparison:
    """``a`` against ``b`` sampled at ``a``'s defined voxel centres."""

    diff: np.ndarray  # a - b where both are defined
    a_defined: int  # voxels of a with acquired data
    both: int  # of those, how many b also covers

    @property
    def overlap(self) -> float:
        return self.both / self.a_defined if self.a_defined else 0.0

    @property
    def max_abs(self) -> float:
        return float(np.abs(self.diff).max()) if self.diff.size else float("nan")


def compare(a, b, a_defined: np.ndarray | None = None, b_defined: np.ndarray | None = None) -> WorldComparison:
    """Sample volume ``b`` at each voxel centre of ``a`` and difference them where both are defined.

    ``a`` and ``b`` are NIfTI images or paths; ``*_defined`` are boolean masks of each volume's
    acquired voxels (None: all voxels).
    """
    a, b = _load(a), _load(b)
    da, db = np.asanyarray(a.dataobj).astype(np.float64), np.asanyarray(b.dataobj).astype(np.float64)
    da, db = da.reshape(da.shape[:3]), db.reshape(db.shape[:3])
    mask_a = np.ones(da.shape, bool) if a_defined is None else a_defined
    points = voxel_world(a.affine, da.shape)
    values, ok = sample(db, b.affine, points, b_defined)
    keep = mask_a.reshape(-1) & ok
    return WorldComparison(da.reshape(-1)[keep] - values[keep], int(mask_a.sum()), int(keep.sum()))
