"""prep under careless or hostile input (issue 18): it never deletes or overwrites what it did not
write, never empties a dataset from an empty input, refuses impossible sizes in milliseconds, and
says what it skipped. Each test reproduces one reported failure."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_prep import limits
from data_prep.prep import UsageError, prepare_site
from data_prep.prep_cli import main
from data_prep.prep_folders import OWNER_FILE
from data_prep.site_dataset import load_site_dataset
from tests.prep.conftest import pattern_volume, prepared_images, tree_digest, write_volume

AFFINE = np.diag([0.9, 0.9, 2.0, 1.0])
SHAPE = (10, 8, 4)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _two_series(root):
    for i in range(2):
        write_volume(root / f"s{i}", AFFINE, pattern_volume(SHAPE, i))
    return root


def _dataset_files(out):
    meta = json.loads((out / "dataset.json").read_text())
    return [e[k] for e in meta["training"] + meta["test"] for k in ("image", "label") if e.get(k)]


def _nnunet_folder(root):
    """What an nnU-Net raw dataset looks like: prep must not take it for its own output."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "imagesTr/liver_001_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), root / "labelsTr/liver_001.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Task03_Liver", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


# --- item 2: prep deletes data it did not write -------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_foreign_dataset_folder_is_refused_even_with_force(tmp_path, capsys, force):
    src = _two_series(tmp_path / "in")
    nnunet = _nnunet_folder(tmp_path / "Dataset003_Liver")
    before = tree_digest(nnunet)
    code = main([str(src), str(nnunet), "--quiet"] + (["--force"] if force else []))
    assert code == 2
    err = capsys.readouterr().err
    assert str(nnunet.resolve()) in err and "not written by fedimaging prep" in err
    assert tree_digest(nnunet) == before  # dataset.json and imagesTr/ untouched


def test_rerun_keeps_files_prep_did_not_write(tmp_path):
    src = _two_series(tmp_path / "in")
    out = tmp_path / "out"
    assert prepare_site(src, out).exit_code == 0
    # A user's own file in prep's case folder, named like a case (the old code deleted every case-*)
    mine = out / "imagesTs" / "case-mine_0000.nii.gz"
    mine.write_bytes(b"a radiologist's file")
    for p in (src / "s1").iterdir():  # a series leaves the input: its files go, the user's stay
        p.unlink()
    result = prepare_site(src, out, force=True)
    assert result.exit_code == 0 and result.report["summary"]["removed_files"] == 2  # image + sidecar
    assert mine.read_bytes() == b"a radiologist's file"
    assert len(prepared_images(out)) == 2  # one case of prep's + the user's file
    assert all((out / f).is_file() for f in _dataset_files(out))
    owner = json.loads((out / "private" / OWNER_FILE).read_text())
    assert "imagesTs/case-mine_0000.nii.gz" not in owner["files"]
    assert set(_dataset_files(out)) <= set(owner["files"])


def test_output_of_an_older_prep_without_owner_list_is_still_updated(tmp_path):
    src = _two_series(tmp_path / "in")
    out = tmp_path / "out"
    prepare_site(src, out)
    (out / "private" / OWNER_FILE).unlink()  # as written before the owner list existed
    for p in (src / "s1").iterdir():
        p.unlink()
    result = prepare_site(src, out)
    assert result.exit_code == 0 and result.report["summary"]["removed_files"] == 2
    assert len(prepared_images(out)) == 1 and (out / "private" / OWNER_FILE).is_file()


@pytest.mark.parametrize("junk", ["empty", "text_files", "non_image_dicom"])
def test_input_without_series_fails_and_changes_nothing(tmp_path, capsys, junk):
    src = _two_series(tmp_path / "in")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--quiet"]) == 0
    before = tree_digest(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    if junk == "text_files":
        (bad / "notes.txt").write_text("not an image")
        (bad / "DICOMDIR.bak").write_bytes(os.urandom(300))
    elif junk == "non_image_dicom":  # no Rows/Columns: not an image volume, only a header
        ds = pydicom.dcmread(next((src / "s0").iterdir()))
        del ds.PixelData, ds.Rows, ds.Columns
        ds.save_as(bad / "x.dcm")
    code = main([str(bad), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and str(bad) in err
    assert tree_digest(out) == before  # the existing dataset is not emptied
    # a fresh output gets no dataset.json claiming success either
    assert main([str(bad), str(tmp_path / "fresh"), "--quiet"]) != 0
    assert not (tmp_path / "fresh" / "dataset.json").exists()


def test_input_with_only_rejected_series_leaves_dataset_unchanged(tmp_path):
    src = _two_series(tmp_path / "in")
    out = tmp_path / "out"
    prepare_site(src, out)
    before = tree_digest(out)
    gaps = tmp_path / "gaps"  # every series unusable (a gap) under the default --uneven reject
    positions = [np.array([0, 0, z], float) for z in (0.0, 2.0, 4.0, 9.0)]
    write_volume(gaps / "g", AFFINE, pattern_volume(SHAPE, 5), positions=positions)
    result = prepare_site(gaps, out)
    assert result.exit_code == 3 and result.nothing_converted
    assert tree_digest(out) == before


# --- item 3: one small file hangs prep -----------------------------------------------------------
def _enhanced_ct(path, frames_declared: int, per_frame_items: int, frames_stored: int):
    """An enhanced CT file; the header may claim more frames than it holds."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "X"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 128, 152, frames_declared
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [1, 1], 1
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for k in range(per_frame_items):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0, 0, float(k)]
        item.PlanePositionSequence = Sequence([pos])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.PixelData = np.zeros((frames_stored, 128, 152), np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("declared, items, stored, reason", [
    (20_000_000, 1, 1, "frame_count_mismatch"),  # the reported 39 KB file
    (20_000_000, 20_000_000 // 10**6, 1, "frame_count_mismatch"),
    (3, 3, 1, "pixel_data_too_short"),
    (-5, 1, 1, "frame_count_invalid"),
])
def test_impossible_frame_count_is_refused_quickly(tmp_path, declared, items, stored, reason):
    src = tmp_path / "in"
    src.mkdir()
    path = _enhanced_ct(src / "big.dcm", declared, items, stored)
    write_volume(src / "ok", AFFINE, pattern_volume(SHAPE, 1))  # an intact series still converts
    assert path.stat().st_size < 50_000
    start = time.perf_counter()
    result = prepare_site(src, tmp_path / "out")
    assert time.perf_counter() - start < 20  # was minutes (20 million frame records)
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert report["unreadable_files"] == {f"invalid_header:{reason}": 1}
    assert result.exit_code == 3 and report["summary"]["converted"] == 1


def test_frames_beyond_the_voxel_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_VOXELS_PER_VOLUME", 128 * 152 * 2)
    src = tmp_path / "in"
    src.mkdir()
    _enhanced_ct(src / "three.dcm", 3, 3, 3)
    write_volume(src / "ok", AFFINE, pattern_volume(SHAPE, 1))
    result = prepare_site(src, tmp_path / "out")
    assert result.report["unreadable_files"] == {"invalid_header:volume_too_large": 1}
    assert result.report["summary"]["converted"] == 1


def test_resample_to_millions_of_slices_is_refused(tmp_path):
    src = tmp_path / "in"
    positions = [np.array([0, 0, z], float) for z in (0.0, 2.0, 4.0, 5_000_000.0)]
    write_volume(src / "far", AFFINE, pattern_volume(SHAPE, 2), positions=positions)
    start = time.perf_counter()
    result = prepare_site(src, tmp_path / "out", uneven="resample")
    assert time.perf_counter() - start < 20
    series = result.report["series"][0]
    assert series["status"] == "rejected" and series["reason"] == "resample_too_many_slices"
    assert "2500001" in series["detail"]  # the slices it would have needed


def test_resample_within_the_limit_still_works(tmp_path):
    src = tmp_path / "in"
    positions = [np.array([0, 0, z], float) for z in (0.0, 2.0, 4.0, 8.0)]  # one missing slice
    write_volume(src / "gap", AFFINE, pattern_volume(SHAPE, 3), positions=positions)
    result = prepare_site(src, tmp_path / "out", uneven="resample")
    assert result.exit_code == 0
    assert nib.load(str(prepared_images(tmp_path / "out")[0])).shape[2] == 5


def test_volume_beyond_the_voxel_limit_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_VOXELS_PER_VOLUME", SHAPE[0] * SHAPE[1] * 3)
    write_volume(tmp_path / "in" / "s", AFFINE, pattern_volume(SHAPE, 4))
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.report["series"][0]["reason"] == "volume_too_large"


# --- item 8: tracebacks instead of errors that name the file -------------------------------------
def test_output_under_a_file_names_the_folder(tmp_path, capsys):
    src = _two_series(tmp_path / "in")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main([str(src), str(blocker / "out"), "--quiet"]) == 2
    assert str(blocker / "out") in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_parent_names_the_folder(tmp_path, capsys):
    src = _two_series(tmp_path / "in")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main([str(src), str(parent / "out"), "--quiet"]) == 2
        assert str(parent / "out") in capsys.readouterr().err
    finally:
        parent.chmod(0o755)


def test_permission_denied_output_names_the_folder(tmp_path, monkeypatch, capsys):
    """The read-only parent as root sees it: mkdir refused (simulated, since root may write anywhere)."""
    src = _two_series(tmp_path / "in")
    target = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main([str(src), str(target), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "Permission denied" in err and "Traceback" not in err


def test_failed_write_never_leaves_dataset_json_naming_deleted_files(tmp_path, monkeypatch):
    src = _two_series(tmp_path / "in")
    out = tmp_path / "out"
    prepare_site(src, out)
    for p in (src / "s1").iterdir():
        p.unlink()

    def read_only_disk(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(out / "dataset.json"))

    monkeypatch.setattr("data_prep.prep.write_dataset_json", read_only_disk)
    with pytest.raises(UsageError, match="dataset.json.*Read-only"):
        prepare_site(src, out, force=True)
    # The old dataset.json is still there and every file it names still exists.
    assert len(_dataset_files(out)) == 2 and all((out / f).is_file() for f in _dataset_files(out))
    monkeypatch.undo()
    prepare_site(src, out)
    assert len(_dataset_files(out)) == 1 and all((out / f).is_file() for f in _dataset_files(out))


def test_deleted_label_is_written_again(tmp_path):
    src = tmp_path / "in"
    labels = tmp_path / "labels"
    labels.mkdir()
    write_volume(src / "s", AFFINE, pattern_volume(SHAPE, 0), series_uid="1.2.3.4.5")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE), labels / "1.2.3.4.5.nii.gz")
    out = tmp_path / "out"
    prepare_site(src, out, labels=labels)
    (label,) = out.glob("labelsTr/*.nii.gz")
    label.unlink()
    prepare_site(src, out, labels=labels)  # the old check looked at the image only
    assert label.is_file() and load_site_dataset(out).training[0].label == label.resolve()


# --- item 9: symlinked folders in the input are skipped without a word ---------------------------
def test_symlinks_in_the_input_are_reported(tmp_path, capsys):
    src = _two_series(tmp_path / "in")
    elsewhere = tmp_path / "elsewhere"
    write_volume(elsewhere / "s", AFFINE, pattern_volume(SHAPE, 7))
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)
    (src / "dangling.dcm").symlink_to(tmp_path / "nothing")
    assert main([str(src), str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert report["skipped_paths"] == {"symlinked_folder": 2, "broken_symlink": 1}
    assert report["summary"]["converted"] == 2 and report["summary"]["skipped_links"] == 3
    assert "2 input link(s) not followed: symlinked_folder" in table
    assert str(tmp_path) not in json.dumps(report)  # counts only, no paths
