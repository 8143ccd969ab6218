"""The demo's "real path": write each synthetic site as a scanner's DICOM export, then ``prep`` it.

A demo site is produced exactly as a hospital's would be: every case becomes a single-frame
DICOM series (per-site Manufacturer / ManufacturerModelName, SliceThickness = slice spacing,
the site's own slice plane and storage order, some sites compressed losslessly with RLE or
JPEG 2000), its label map a NIfTI file in a labels folder with a ``mapping.json`` that names the
series and, for held-out test cases, ``"split": "test"``. :func:`data_prep.prep.prepare_site`
then converts the tree, so ``flwr run .`` exercises DICOM -> NIfTI -> training.

Staging (``images/<case>/*.dcm``, ``labels/<case>.nii.gz`` + ``labels/mapping.json``) lives in a
temporary sibling of the site folder (``.<site>.dicom.*.tmp``) and is removed afterwards: the
ClientApp needs only the NIfTI, the DICOM would double the cache's size, and prep refuses an
input inside its output. ``keep`` moves it to a folder of the user's choice (``fedimaging
demo-data --keep-dicom``) to look at or to run ``fedimaging prep`` on by hand.

Determinism: UIDs come from ``generate_uid(entropy_srcs=...)`` of (generator version, seed,
site, size, case) and the site secret from (version, seed, site), so the same seed gives the
same case pseudonyms, file names and voxels. The secret protects nothing here (the data are
synthetic); a real site's secret is random. Header values are obviously fake (``DEMO^...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.uid import generate_uid

from data_prep import deid
from data_prep.prep import PrepResult, prepare_site
from data_prep.synthetic_dicom import write_volume

CT_INTERCEPT = -1024.0  # CT stored as int16 = HU + 1024 with RescaleIntercept -1024 (HU survive exactly)
DICOM_DIR, LABELS_DIR, MAPPING = "images", "labels", "mapping.json"
_PLANES = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}


def slice_plane(orientation: str) -> str:
    """'axial', 'coronal' or 'sagittal': the plane of slices whose third storage axis is given."""
    return _PLANES[orientation[2]]


@contextlib.contextmanager
def staging_folder(site_dir: Path, keep: str | os.PathLike | None = None) -> Iterator[Path]:
    """Temporary folder beside ``site_dir`` for the DICOM tree; removed, or moved to ``keep``."""
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}.dicom.", suffix=".tmp", dir=site_dir.parent))
    try:
        yield tmp
        if keep is not None:
            keep = Path(keep)
            if keep.exists():
                shutil.rmtree(keep)
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp), str(keep))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _header(profile, site: str, case: str) -> dict:
    """Scanner identity and obviously fake patient/study values for one case."""
    if profile.modality == "MR":
        image_type = ["ORIGINAL", "PRIMARY", "M", "ND"]
    elif slice_plane(profile.orientation) == "axial":
        image_type = ["ORIGINAL", "PRIMARY", "AXIAL"]
    else:  # CT slices in another plane are reformats of the axial acquisition
        image_type = ["DERIVED", "SECONDARY", "REFORMATTED"]
    plane = slice_plane(profile.orientation)
    return {
        "Manufacturer": profile.manufacturer,
        "ManufacturerModelName": profile.model,
        "ImageType": image_type,
        "PatientName": f"DEMO^{site.upper().replace('-', '')}",
        "PatientID": f"DEMO-{case}",
        "StudyDescription": "SYNTHETIC DEMO ABDOMEN",
        "SeriesDescription": f"SYNTHETIC {plane.upper()} {profile.modality}",
        "SeriesNumber": 2,
        "BodyPartExamined": "ABDOMEN",
    }


def stage_case(staging: Path, profile, site: str, case: str, uid_seed: str, image: np.ndarray,
               label: np.ndarray, affine: np.ndarray, held_out: bool) -> tuple[str, dict]:
    """Write one case's DICOM series and label map; return (label file name, mapping entry)."""
    modality = profile.modality
    intercept = CT_INTERCEPT if modality == "CT" else 0.0
    series_uid = str(generate_uid(entropy_srcs=[uid_seed, "series"]))
    write_volume(staging / DICOM_DIR / case, affine, image, modality=modality, series_uid=series_uid,
                 intercept=intercept, extra=_header(profile, site, case), uid_seed=uid_seed,
                 transfer_syntax=profile.transfer_syntax)
    labels = staging / LABELS_DIR
    labels.mkdir(parents=True, exist_ok=True)
    name = f"{case}.nii.gz"
    img = nib.Nifti1Image(label, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(labels / name))
    return name, {"series_uid": series_uid, "split": "test" if held_out else "train"}


def write_mapping(staging: Path, mapping: dict[str, dict]) -> None:
    """The labels folder's ``mapping.json`` (label file -> series UID and split)."""
    (staging / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    (staging / LABELS_DIR / MAPPING).write_text(json.dumps(mapping, indent=2, sort_keys=True) + "\n")


def _write_secret(out: Path, secret_seed: str) -> None:
    """A reproducible site secret (synthetic data only), so case pseudonyms follow the seed."""
    path = deid.private_dir(out) / deid.SECRET_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(hashlib.sha256(secret_seed.encode()).hexdigest() + "\n")


def prep_staged_site(staging: Path, out: Path, secret_seed: str, modality: str, name: str,
                     label_names: dict[str, int], workers: int = 1) -> PrepResult:
    """Run prep on the staged tree into the (empty, temporary) ``out``; every series must convert."""
    _write_secret(out, secret_seed)
    # force: the folder is fresh but already holds the secret written above
    result = prepare_site(staging / DICOM_DIR, out, labels=staging / LABELS_DIR, workers=workers,
                          force=True, modality=modality, name=name, label_names=label_names)
    summary = result.report["summary"]
    if result.exit_code != 0 or summary["converted"] != summary["series"]:
        raise RuntimeError(f"prep of the demo DICOM in {staging} did not convert every series "
                           f"(exit code {result.exit_code}):\n{result.table}")
    return result
