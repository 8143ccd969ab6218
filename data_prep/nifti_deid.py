"""De-identified reading of NIfTI images and their sidecar JSON files.

A NIfTI written by a hospital tool can carry names and dates in ``descrip``, ``aux_file``,
``intent_name``, ``db_name``, in header extensions (DICOM, AFNI, JSON, comments) and in BIDS-style
sidecar JSON files. Nothing of the source header is copied: :func:`read_image` returns only the
voxel values (scaling applied, the stored datatype kept where scaling is the identity) and the
affine; :func:`data_prep.nifti_writer.write_nifti` then writes a fresh header (geometry,
datatype, no scaling, no extensions, generic text). Sidecars pass through the same whitelist as
DICOM acquisition parameters (:data:`data_prep.deid.SIDECAR_FIELDS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep import deid

# Stored types kept as they are (others become float32): MONAI reads them all as float.
KEPT_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32)


class ImageError(Exception):
    """An image cannot be imported; ``reason`` is a report code, ``detail`` a short explanation."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class CleanImage:
    """Voxel values and geometry of one NIfTI, nothing else from its header."""

    data: np.ndarray
    affine: np.ndarray
    stored_dtype: str  # the source's on-disk datatype (e.g. uint8, float32)
    scaled: bool  # the source header had a non-identity scl_slope/scl_inter


def read_image(path: str | Path) -> CleanImage:
    """Read ``path`` (NIfTI-1/2, .nii or .nii.gz) into a :class:`CleanImage`, or raise ImageError."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageError("not_nifti", f"{type(img).__name__} is not a NIfTI image")
        stored = np.dtype(img.get_data_dtype())
        slope, inter = img.header.get_slope_inter()
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except ImageError:
        raise
    except Exception as exc:  # truncated gzip, bad header, ...
        raise ImageError("image_unreadable", type(exc).__name__) from exc
    scaled = not ((slope is None or slope == 1) and (inter is None or inter == 0))
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype.type not in KEPT_DTYPES:
        data = data.astype(np.float32)
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images: (x, y, z, 1, c)
        data = data[:, :, :, 0, :]
    if data.ndim not in (3, 4):
        raise ImageError("image_not_3d_or_4d", f"shape {tuple(data.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ImageError("bad_affine", "the image's affine is singular or not finite")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise ImageError("non_finite_voxels", f"{bad} voxels are NaN or infinite")
    return CleanImage(data, affine, stored.name, scaled)


def channels_of(image: CleanImage) -> list[np.ndarray]:
    """The 3D volumes of an image: one for 3D, one per entry of the 4th dimension for 4D."""
    if image.data.ndim == 3:
        return [image.data]
    return [np.ascontiguousarray(image.data[..., c]) for c in range(image.data.shape[3])]


def sidecar_for(image_path: str | Path) -> Path | None:
    """The BIDS-style sidecar beside an image (``x.nii.gz`` -> ``x.json``), if there is one."""
    path = Path(image_path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            candidate = path.with_name(name[: -len(suffix)] + ".json")
            return candidate if candidate.is_file() else None
    return None


def clean_sidecar(path: str | Path | None) -> dict:
    """Whitelisted acquisition fields of a sidecar JSON (empty when absent or unreadable)."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    kept = {k: v for k, v in raw.items() if isinstance(v, (int, float, str, list)) and not isinstance(v, bool)}
    return deid.acquisition_sidecar(kept)
