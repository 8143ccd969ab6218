"""Write synthetic single-frame DICOM series with a known geometry (tests, benchmark, demo data).

The DICOM attributes are derived from a RAS affine by the standard's definitions (PS3.3
C.7.6.2.1.1) without using the converter's geometry code, so what prep reads back can be
checked against the geometry used to write. The demo federation writes its sites through this
function too (``uid_seed`` makes every UID, and so every file, reproducible; ``transfer_syntax``
compresses losslessly with RLE or JPEG 2000 as some scanners and PACS exports do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

# Transfer syntaxes write_volume can produce; compressed ones are encoded with the pylibjpeg
# plugins (pylibjpeg-rle, pylibjpeg-openjpeg), which prep also uses to decode.
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}


def write_volume(folder: Path, ras_affine: np.ndarray, volume: np.ndarray, modality: str = "CT",
                 series_uid: str | None = None, positions: list[np.ndarray] | None = None,
                 slice_order: list[int] | None = None, phi: dict | None = None,
                 slope: float = 1.0, intercept: float = 0.0, extra: dict | None = None,
                 prefix: str = "im", study_uid: str | None = None, uid_seed: str | None = None,
                 transfer_syntax: str = "explicit") -> list[Path]:
    """Write ``volume`` (indexed col, row, slice) as single-frame DICOM slices.

    ``ras_affine`` maps (col, row, slice) to RAS mm. ``positions`` overrides the LPS position
    of each slice (tilt, gaps); ``slice_order`` permutes file names and InstanceNumbers.
    Stored value = (voxel - intercept) / slope, as int16. ``uid_seed`` derives the study,
    series and SOP instance UIDs from it instead of at random (same seed, same files).
    ``transfer_syntax`` is one of :data:`TRANSFER_SYNTAXES` (lossless only).
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (col, row, slice), got shape {volume.shape}")

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=[uid_seed, *map(str, parts)]) if uid_seed is not None else generate_uid()

    folder.mkdir(parents=True, exist_ok=True)
    flip = np.diag([-1.0, -1.0, 1.0])
    col_vec = flip @ ras_affine[:3, 0]  # step along a row (increasing column index), LPS
    row_vec = flip @ ras_affine[:3, 1]  # step down a column (increasing row index), LPS
    dx, dy = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    iop = list(col_vec / dx) + list(row_vec / dy)
    series_uid = series_uid or uid("series")
    study_uid = study_uid or uid("study")
    nz = volume.shape[2]
    order = slice_order or list(range(nz))
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()  # the series' header once; each slice changes only its own elements below
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.Manufacturer = "SYNTHETIC"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
    ds.SliceThickness = f"{np.linalg.norm(ras_affine[:3, 2]):.6f}"
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.MagneticFieldStrength = "3"
        ds.EchoTime = "4.5"
        ds.RepetitionTime = "2000"
    fixed = {**(phi or {}), **(extra or {})}  # caller's values win, per-slice ones included
    for key, value in fixed.items():
        setattr(ds, key, value)
    paths = []
    for n, k in enumerate(order):
        ipp = positions[k] if positions is not None else flip @ (ras_affine @ [0, 0, k, 1])[:3]
        per_slice = {"SOPInstanceUID": uid("instance", series_uid, n), "InstanceNumber": n + 1,
                     "ImagePositionPatient": [f"{v:.6f}" for v in ipp]}
        for key, value in per_slice.items():
            if key not in fixed:
                setattr(ds, key, value)
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        stored = np.round((volume[:, :, k].T - intercept) / slope)
        if stored.size and (stored.min() < -32768 or stored.max() > 32767):
            raise ValueError(f"slice {k} of {folder}: stored values {stored.min():g}..{stored.max():g} "
                             "do not fit int16; choose another slope/intercept")
        stored = np.ascontiguousarray(stored.astype(np.int16))
        if transfer_syntax == "explicit":
            ds.PixelData = stored.tobytes()
        else:
            ds.compress(TRANSFER_SYNTAXES[transfer_syntax], stored, encoding_plugin="pylibjpeg",
                        generate_instance_uid=False)
        path = folder / f"{prefix}{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
