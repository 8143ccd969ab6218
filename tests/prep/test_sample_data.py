"""DICOM files shipped inside installed wheels (pydicom, nibabel): transfer syntaxes, non-image
objects, corrupt files, DICOMDIR, Siemens mosaic and Philips enhanced multi-frame."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from data_prep.prep import prepare_site
from tests.prep.conftest import (NIBABEL_DATA, geometry_difference, pattern_volume, prepared_images,
                                 run_dcm2niix, write_volume)


def _copy(tmp_path: Path, names: list[str], sub: str = "in") -> Path:
    folder = tmp_path / sub
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(get_testdata_file(name), folder / name)
    return folder


def _report(out: Path) -> dict:
    return json.loads((out / "prep_report.json").read_text())


def _voxels(out: Path) -> np.ndarray:
    images = prepared_images(out)
    assert len(images) == 1
    return nib.load(str(images[0])).get_fdata()


def test_ct_small_in_hounsfield_units(tmp_path):
    src = _copy(tmp_path, ["CT_small.dcm"])
    result = prepare_site(src, tmp_path / "out")
    assert result.exit_code == 0
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(_voxels(tmp_path / "out")[:, :, 0], expected.T)
    assert json.loads((tmp_path / "out/dataset.json").read_text())["channel_names"] == {"0": "CT"}


LOSSLESS_MR = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
               "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm"]


@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_lossless_transfer_syntaxes_equal_uncompressed(tmp_path, name):
    prepare_site(_copy(tmp_path, ["MR_small.dcm"], "a"), tmp_path / "out_a")
    prepare_site(_copy(tmp_path, [name], "b"), tmp_path / "out_b")
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.T
    np.testing.assert_array_equal(_voxels(tmp_path / "out_a")[:, :, 0], reference)
    np.testing.assert_array_equal(_voxels(tmp_path / "out_b"), _voxels(tmp_path / "out_a"))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_compressed_series_written_by_pydicom(tmp_path, syntax):
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    volume = pattern_volume((64, 48, 3), seed=9)
    paths = write_volume(tmp_path / "in", affine, volume)
    for p in paths:
        ds = pydicom.dcmread(p)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
        ds.save_as(p, enforce_file_format=True)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 0, result.table
    np.testing.assert_array_equal(_voxels(tmp_path / "out"), volume)


def test_truncated_file_fails_only_its_series(tmp_path):
    src = _copy(tmp_path, ["MR_truncated.dcm", "CT_small.dcm"])
    result = prepare_site(src, tmp_path / "out", modality="MR")
    rep = _report(tmp_path / "out")
    by_status = {(s["status"], s.get("reason")) for s in rep["series"]}
    assert ("rejected", "pixel_decode_failed") in by_status
    assert result.exit_code == 3 and result.nothing_converted  # a report, but no empty dataset.json
    assert not (tmp_path / "out" / "dataset.json").exists()
    # The same run with CT chosen converts the intact CT file.
    result = prepare_site(src, tmp_path / "out_ct", modality="CT")
    assert len(prepared_images(tmp_path / "out_ct")) == 1


def test_non_image_objects_skipped_with_reasons(tmp_path):
    names = ["rtstruct.dcm", "test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm", "rtdose.dcm",
             "SC_rgb_jpeg.dcm", "CT_small.dcm"]
    src = _copy(tmp_path, names)
    (src / "notes.txt").write_text("not dicom")
    result = prepare_site(src, tmp_path / "out")
    rep = _report(tmp_path / "out")
    reasons = sorted(s["reason"] for s in rep["series"] if s["status"] == "skipped")
    assert reasons == sorted(["non_image_rtstruct", "non_image_structured_report", "non_image_radiotherapy",
                              "non_image_waveform", "non_image_radiotherapy", "secondary_capture"])
    assert rep["summary"]["non_dicom_files"] == 1
    assert rep["summary"]["converted"] == 1 and result.exit_code == 0


def test_dicomdir_ignored_and_tree_scanned(tmp_path):
    root = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
    result = prepare_site(root, tmp_path / "out", modality="CT")
    rep = _report(tmp_path / "out")
    assert rep["summary"]["dicomdir_files"] >= 1
    ct = [s for s in rep["series"] if s.get("modality") == "CT"]
    assert any(s["status"] == "converted" for s in ct)
    assert any(s.get("reason") == "localizer" for s in ct)  # the CT scout is set aside
    assert all(s["status"] == "skipped" for s in rep["series"] if s.get("modality") == "MR")
    assert result.exit_code in (0, 3)
    for image in prepared_images(tmp_path / "out"):
        assert nib.load(str(image)).shape[2] >= 1


def _gunzip_to(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name.removesuffix(".gz")).write_bytes(gzip.decompress((NIBABEL_DATA / name).read_bytes()))
    return folder


def test_siemens_mosaic_4d_matches_dcm2niix(tmp_path):
    src = _gunzip_to(tmp_path / "in", ["siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"])
    result = prepare_site(src, tmp_path / "out")
    assert result.exit_code == 0, result.table
    images = prepared_images(tmp_path / "out")
    assert nib.load(str(images[0])).shape == (128, 128, 48, 2)
    refs = run_dcm2niix(src, tmp_path / "ref")
    diffs = [geometry_difference(images[0], r) for r in refs]
    assert any(d is not None and d[0] <= 1e-3 and d[1] == 0 for d in diffs), diffs


def test_inconsistent_mosaic_rejected(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(NIBABEL_DATA / "0.dcm", src / "0.dcm")  # 256 rows do not divide into 7 tiles
    result = prepare_site(src, tmp_path / "out")
    assert _report(tmp_path / "out")["series"][0]["reason"] == "mosaic_inconsistent"
    assert result.exit_code == 3


def test_philips_enhanced_multiframe_matches_dcm2niix(tmp_path):
    src = _gunzip_to(tmp_path / "in", ["philips_mprage.dcm.gz"])
    result = prepare_site(src, tmp_path / "out")
    assert result.exit_code == 0
    images = prepared_images(tmp_path / "out")
    refs = run_dcm2niix(src, tmp_path / "ref")
    diffs = [geometry_difference(images[0], r) for r in refs]
    assert any(d is not None and d[0] <= 1e-3 and d[1] <= 1e-3 for d in diffs), diffs


def test_jpeg_extended_lossy_through_pylibjpeg(tmp_path):
    """JPEG process 2/4 (the lossy baseline family): header made a CT slice, voxels = decoder's."""
    src = tmp_path / "in"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.Modality = "CT"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.save_as(src / "slice.dcm")
    result = prepare_site(src, tmp_path / "out")
    assert result.exit_code == 0, result.table
    np.testing.assert_array_equal(_voxels(tmp_path / "out")[:, :, 0], ds.pixel_array.T)


@pytest.mark.parametrize("uid,reason", [
    ("1.2.840.10008.5.1.4.1.1.7", "secondary_capture"),
    ("1.2.840.10008.5.1.4.1.1.7.4", "secondary_capture"),
    ("1.2.840.10008.5.1.4.1.1.88.67", "non_image_structured_report"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "non_image_rtstruct"),
    ("1.2.840.10008.5.1.4.1.1.11.1", "non_image_presentation_state"),
    ("1.2.840.10008.5.1.4.1.1.66", "non_image_raw_data"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "non_image_segmentation"),
    ("1.2.840.10008.5.1.4.1.1.2", None),  # CT image
    ("1.2.840.10008.5.1.4.1.1.4.1", None),  # enhanced MR
    ("1.2.840.10008.5.1.4.1.1.77.1.1", None),  # not secondary capture despite the "7" prefix
])
def test_sop_class_reasons(uid, reason):
    from data_prep.scan import sop_class_skip_reason

    assert sop_class_skip_reason(uid) == reason
