"""The cases ``fedimaging predict`` reads: a NIfTI file, or a DICOM series folder.

A DICOM series is converted by ``data_prep``'s own code (the same scan, grouping, geometry and
pixel reading as ``fedimaging prep``) into a NIfTI file in a work folder. Each case keeps the
input's grid (affine and shape) so the mask can be written back on it. Images with NaN or
infinite voxels are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from app.predict_model import PredictError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CT_AIR_THRESHOLD = -500.0  # HU: any voxel below this means the image is a CT (air is -1000)


@dataclass
class CaseInput:
    """One case as a NIfTI file (converted from DICOM if needed) plus the grid to write back on."""

    name: str
    nifti: Path
    affine: np.ndarray
    shape: tuple[int, int, int]
    modality: str | None  # from the DICOM header; None for NIfTI
    channels: tuple[Path, ...] = ()  # multi-channel models: one file per channel (see app.predict_channels)

    @property
    def image_item(self) -> str | list[str]:
        """What the task's LoadImaged reads: the file, or the channel files (stacked as channels)."""
        return [str(p) for p in self.channels] if self.channels else str(self.nifti)


def case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name[:-5] if name.endswith("_0000") else name


def check_finite_image(data: np.ndarray, where: Path) -> None:
    """Refuse an image with NaN or infinite voxels: the model would see garbage and say 'background'."""
    if data.dtype.kind not in "fc":
        return
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise PredictError(f"{where}: {bad} of {data.size} voxels are NaN or infinite; predict refuses "
                           "such an image (a damaged export? convert it again)")


def _check_3d(shape: tuple[int, ...], where: Path) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise PredictError(f"{where}: expected a 3D volume, got shape {tuple(shape)} (split 4D series first)")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def dicom_series_to_nifti(folder: Path, out: Path) -> tuple[np.ndarray, tuple[int, int, int], str]:
    """Convert the one image series in ``folder`` with prep's own code; returns (affine, shape, modality)."""
    from data_prep.convert import find_series, read_series
    from data_prep.geometry import GeometryError
    from data_prep.nifti_writer import write_nifti
    from data_prep.pixels import PixelError

    _, groups = find_series(folder)
    volumes = [g for g in groups if g.status == "pending"]
    if not volumes:
        reasons = sorted({str(g.reason) for g in groups}) or ["no DICOM image files"]
        raise PredictError(f"{folder}: no convertible image series ({', '.join(reasons)})")
    if len(volumes) > 1:
        raise PredictError(
            f"{folder}: holds {len(volumes)} image series; point --input at one series folder "
            "(or run 'fedimaging prep' and predict on its NIfTI files)"
        )
    group = volumes[0]
    try:
        plan, data = read_series(group.frames)
    except (GeometryError, PixelError) as exc:
        raise PredictError(f"{folder}: cannot convert the series: {getattr(exc, 'reason', exc)}") from None
    shape = _check_3d(data.shape, folder)
    check_finite_image(data, folder)
    write_nifti(out, data.reshape(shape), plan.affine)
    return np.asarray(nib.load(str(out)).affine), shape, group.modality


def open_case(path: Path, workdir: Path, in_channels: int = 1) -> CaseInput:
    """A NIfTI file as is, or a DICOM series folder converted into ``workdir``; N channels: see predict_channels."""
    if in_channels > 1:
        from app.predict_channels import open_channels

        if not path.is_file():
            raise PredictError(f"input {path} does not exist")
        name, files, affine, shape = open_channels(path, workdir, in_channels, PredictError)
        return CaseInput(name, files[0], affine, shape, None, tuple(files))
    if path.is_dir():
        nifti = workdir / f"{path.name or 'series'}.nii.gz"
        affine, shape, modality = dicom_series_to_nifti(path, nifti)
        return CaseInput(path.name, nifti, affine, shape, modality)
    if not path.is_file():
        raise PredictError(f"input {path} does not exist")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise PredictError(f"input {path}: expected a .nii/.nii.gz file or a DICOM series folder")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types
        raise PredictError(f"cannot read NIfTI {path}: {exc}") from None
    shape = _check_3d(tuple(image.shape), path)
    try:
        voxels = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file fails while read
        raise PredictError(f"cannot read the voxels of NIfTI {path}: {type(exc).__name__}: {exc}") from None
    check_finite_image(voxels, path)
    return CaseInput(case_name(path), path, np.asarray(image.affine), shape, None)


def guess_modality(case: CaseInput, requested: str = "auto", channel_names=None):
    """CT or MR: as requested, else the DICOM header, else CT if the image holds air in HU.

    A multi-channel case is normalised per channel by the names the sites agreed on (``channel_names``).
    """
    if case.channels:
        if channel_names:
            return tuple(channel_names)
        return (requested if requested in ("CT", "MR") else "MR",) * len(case.channels)
    if requested in ("CT", "MR"):
        return requested
    if case.modality in ("CT", "MR"):
        return case.modality
    data = np.asanyarray(nib.load(str(case.nifti)).dataobj)
    return "CT" if float(np.min(data)) < CT_AIR_THRESHOLD else "MR"
