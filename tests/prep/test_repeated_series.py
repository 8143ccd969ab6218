"""One SeriesInstanceUID, several SeriesNumbers: re-saved copies of one stack are converted once,
different stacks are kept apart (as dcm2niix does), and the report says which happened."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
from pydicom.uid import JPEGBaseline8Bit

from data_prep.prep import prepare_site
from data_prep.scan import scan_tree
from data_prep.series import group_series
from tests.prep.conftest import geometry_difference, pattern_volume, prepared_images, run_dcm2niix, write_volume

AFFINE = np.diag([0.8, 0.9, 2.0, 1.0])
UID = "1.2.826.0.1.3680043.8.498.777"


def _series(out):
    return json.loads((out / "prep_report.json").read_text())["series"]


def _same_volume(img, volume) -> bool:
    diff = geometry_difference(img, nib.Nifti1Image(volume.astype(np.float32), AFFINE))
    return diff is not None and diff[0] <= 1e-3 and diff[1] == 0


def test_repeated_stack_is_converted_once(tmp_path):
    volume = pattern_volume((32, 33, 4), seed=11)  # JPEG 2000 needs 32+ pixels a side
    for number, syntax in enumerate(("explicit", "rle", "jpeg2000"), start=1):
        write_volume(tmp_path / "in", AFFINE, volume, series_uid=UID, prefix=f"s{number}_",
                     extra={"SeriesNumber": number, "AcquisitionNumber": 1}, transfer_syntax=syntax)
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 0, result.table
    images = prepared_images(tmp_path / "out")
    assert len(images) == 1
    img = nib.load(str(images[0]))
    assert img.shape == volume.shape  # one 3D volume, not three identical time points
    assert _same_volume(img, volume)
    series = _series(tmp_path / "out")
    assert sorted((s["status"], s.get("reason")) for s in series) == [
        ("converted", None), ("skipped", "repeated_series"), ("skipped", "repeated_series")]
    kept = next(s for s in series if s["status"] == "converted")
    assert "repeated_series_ignored" in kept["warnings"] and kept["part"] == 0
    assert all(s["files"] == volume.shape[2] for s in series)
    if shutil.which("dcm2niix"):  # dcm2niix writes each SeriesNumber as its own series: all equal ours
        refs = [r for r in run_dcm2niix(tmp_path / "in", tmp_path / "ref") if r.parent.name == "pn"]
        assert len(refs) == 3
        assert all(_same_volume(nib.load(str(r)), volume) for r in refs)


def test_repeat_kept_from_a_lossless_copy(tmp_path):
    volume = pattern_volume((6, 6, 4), seed=12)
    for number in (1, 2):
        write_volume(tmp_path / "in", AFFINE, volume, series_uid=UID, prefix=f"s{number}_",
                     extra={"SeriesNumber": number})
    frames = scan_tree(tmp_path / "in").frames
    # copy 1 as if it had been saved lossy (JPEG baseline): copy 2 must be the one converted
    frames = [dataclasses.replace(f, transfer_syntax=JPEGBaseline8Bit) if f.series_number == 1 else f
              for f in frames]
    groups = group_series(frames)
    assert [(g.part, g.status, g.reason, {f.series_number for f in g.frames}) for g in groups] == [
        (0, "pending", None, {2}), (1, "skipped", "repeated_series", {1})]


def test_different_stacks_under_one_uid_split_by_series_number(tmp_path):
    a, b = pattern_volume((8, 7, 5), seed=13), pattern_volume((8, 7, 5), seed=14)
    # same positions and numbers, another reconstruction kernel: a different series, not a repeat
    write_volume(tmp_path / "in", AFFINE, a, series_uid=UID, prefix="a",
                 extra={"SeriesNumber": 3, "ConvolutionKernel": "B30f"})
    write_volume(tmp_path / "in", AFFINE, b, series_uid=UID, prefix="b",
                 extra={"SeriesNumber": 4, "ConvolutionKernel": "B70f"})
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 0, result.table
    series = _series(tmp_path / "out")
    assert [s["status"] for s in series] == ["converted", "converted"]
    assert all("split_by_series_number" in s["warnings"] for s in series)
    images = [nib.load(str(p)) for p in prepared_images(tmp_path / "out")]
    assert sorted(_same_volume(img, a) for img in images) == [False, True]
    assert sorted(_same_volume(img, b) for img in images) == [False, True]
