"""Write synthetic single-frame DICOM series with a known geometry (tests, benchmark, demo data).

The DICOM attributes are derived from a RAS affine by the standard's definitions (PS3.3
C.7.6.2.1.1) without using the converter's geometry code, so what prep reads back can be
checked against the geometry used to write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_volume(folder: Path, ras_affine: np.ndarray, volume: np.ndarray, modality: str = "CT",
                 series_uid: str | None = None, positions: list[np.ndarray] | None = None,
                 slice_order: list[int] | None = None, phi: dict | None = None,
                 slope: float = 1.0, intercept: float = 0.0, extra: dict | None = None,
                 prefix: str = "im") -> list[Path]:
    """Write ``volume`` (indexed col, row, slice) as single-frame DICOM slices.

    ``ras_affine`` maps (col, row, slice) to RAS mm. ``positions`` overrides the LPS position
    of each slice (tilt, gaps); ``slice_order`` permutes file names and InstanceNumbers.
    Stored value = (voxel - intercept) / slope.
    """
    folder.mkdir(parents=True, exist_ok=True)
    flip = np.diag([-1.0, -1.0, 1.0])
    col_vec = flip @ ras_affine[:3, 0]  # step along a row (increasing column index), LPS
    row_vec = flip @ ras_affine[:3, 1]  # step down a column (increasing row index), LPS
    dx, dy = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    iop = list(col_vec / dx) + list(row_vec / dy)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    nz = volume.shape[2]
    order = slice_order or list(range(nz))
    paths = []
    for n, k in enumerate(order):
        ipp = positions[k] if positions is not None else flip @ (ras_affine @ [0, 0, k, 1])[:3]
        meta = FileMetaDataset()
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.Manufacturer = "SYNTHETIC"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n + 1
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
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
        for key, value in (phi or {}).items():
            setattr(ds, key, value)
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = folder / f"{prefix}{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
