"""Shared helpers for the prep tests: test-data locations, comparisons, synthetic volumes.

The synthetic DICOM writer (``data_prep.synthetic_dicom.write_volume``) starts from a known RAS
affine and derives the DICOM attributes from the standard's definitions, without using the
converter's geometry code, so tests can check output against the geometry used to write.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_prep.synthetic_dicom import write_volume  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]
DICOM2NIFTI = REPO.parent / "shared" / "testdata" / "dicom2nifti"
NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"

PHI = {
    "PatientName": "Doe^Jonathan^Q",
    "PatientID": "MRN7734129",
    "PatientBirthDate": "19610423",
    "AccessionNumber": "ACC55120987",
    "InstitutionName": "Saint Elsewhere General Hospital",
    "InstitutionAddress": "42 Wallaby Way Springfield",
    "StationName": "CTSCANNER-EAST-07",
    "ReferringPhysicianName": "Kildare^Xavier",
    "StudyDate": "20230917",
    "SeriesDescription": "Zyqxw private protocol",
}


def dicom2nifti_dir() -> Path:
    if not DICOM2NIFTI.is_dir():
        pytest.skip(f"dicom2nifti test data not found at {DICOM2NIFTI} (clone ../shared beside the repo)")
    return DICOM2NIFTI


def dcm2niix_path() -> str:
    path = shutil.which("dcm2niix")
    if path is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    return path


def run_dcm2niix(src: Path, dst: Path) -> list[Path]:
    """dcm2niix outputs with its default scaling and with ``-p n`` (RescaleSlope/Intercept only).

    Prep applies RescaleSlope/Intercept, as DICOM defines; dcm2niix by default applies Philips'
    private "precise" scaling instead, so a match with either run counts.
    """
    out = []
    for flag in ("y", "n"):
        folder = dst / f"p{flag}"
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([dcm2niix_path(), "-p", flag, "-z", "y", "-b", "n", "-f", "%s_%e_%z_%j",
                        "-o", str(folder), str(src)], check=True, capture_output=True)
        out += sorted(folder.glob("*.nii.gz"))
    return out


def canonical(path_or_img):
    img = nib.load(str(path_or_img)) if not isinstance(path_or_img, nib.Nifti1Image) else path_or_img
    img = nib.as_closest_canonical(img)
    data = np.asanyarray(img.get_fdata())
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return img.affine, data


def geometry_difference(a, b) -> tuple[float, float] | None:
    """(max affine difference mm, max voxel difference) after canonical reorientation; None if shapes differ."""
    aff_a, da = canonical(a)
    aff_b, db = canonical(b)
    if da.shape != db.shape:
        return None
    return float(np.abs(aff_a - aff_b).max()), float(np.abs(da - db).max())


def prepared_images(out: Path) -> list[Path]:
    return sorted(list(out.glob("imagesTr/*.nii.gz")) + list(out.glob("imagesTs/*.nii.gz")))


def all_output_bytes(out: Path) -> list[tuple[Path, bytes]]:
    """Every output file's bytes, gzip members decompressed."""
    items = []
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            items.append((p, data))
    return items


def tree_digest(root: Path) -> dict:
    """Path -> (size, mtime_ns, bytes) of every file, to prove inputs are never modified."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def oblique_affine(angles_deg=(20.0, -15.0, 10.0), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)):
    """A RAS affine with a general rotation (Euler angles about x, y, z)."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def pattern_volume(shape=(12, 10, 6), seed=0) -> np.ndarray:
    """Integer voxel values in [-1000, 1500), distinct enough to catch flips and permutations."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=shape).astype(np.float64)


@pytest.fixture
def dicom_folder(tmp_path) -> Path:
    return tmp_path / "dicom"


def read_pixel(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array
