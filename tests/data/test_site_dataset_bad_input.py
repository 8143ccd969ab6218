"""The site dataset loader under hostile dataset.json values and files (issue 18, items 8 and 9).

Each case was a traceback (TypeError, RuntimeError, ValueError, ImageFileError, RecursionError)
or was accepted silently; each must now be a DatasetError whose message names the file or value.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.config import parse_run_config
from data_prep.site_dataset import DatasetError, SiteDataset, load_site_dataset
from tasks import get_task
from tests.data.test_site_dataset import _classification_site, _error, _meta, _nifti, _rewrite, make_site


def _set_image(root: Path, rel, index: int = 0, key: str = "image") -> str:
    meta = _meta(root)
    meta["training"][index][key] = rel
    _rewrite(root, meta)
    return _error(root)


# --- item 8: tracebacks --------------------------------------------------------------------------
def test_class_index_of_10_to_the_400(tmp_path):
    root = _classification_site(tmp_path / "s", [0, 1])
    meta = _meta(root)
    meta["training"][1]["label"] = 10**400
    (root / "dataset.json").write_text(json.dumps(meta))
    message = _error(root)
    assert "training[1]" in message and "class label 1000000" in message and "chars)" in message
    assert len(message) < 600


def test_integer_too_long_to_parse(tmp_path):
    root = make_site(tmp_path / "s")
    text = (root / "dataset.json").read_text().replace('"numTraining": 2', '"numTraining": 1' + "0" * 5000)
    (root / "dataset.json").write_text(text)
    assert "is not valid JSON" in _error(root)


def test_symlink_loop_image(tmp_path):
    root = make_site(tmp_path / "s")
    os.symlink("loop_b.nii.gz", root / "imagesTr" / "loop_a.nii.gz")
    os.symlink("loop_a.nii.gz", root / "imagesTr" / "loop_b.nii.gz")
    message = _set_image(root, "imagesTr/loop_a.nii.gz")
    assert "imagesTr/loop_a.nii.gz" in message and "symlink loop" in message


def test_nul_byte_in_a_path(tmp_path):
    message = _set_image(make_site(tmp_path / "s"), "imagesTr/case\x00_0000.nii.gz")
    assert "training[0]" in message and "NUL byte" in message


@pytest.mark.parametrize("rel", ["imagesTr/" + "x" * 5000 + "_0000.nii.gz", "/".join(["d"] * 3000)])
def test_five_thousand_character_name(tmp_path, rel):
    message = _set_image(make_site(tmp_path / "s"), rel)
    assert "too long" in message and "chars)" in message and len(message) < 800


@pytest.mark.parametrize("content", ["text", "png", "mgh", "gzip_of_text"])
def test_label_that_is_not_nifti(tmp_path, content):
    root = make_site(tmp_path / "s")
    label = root / "labelsTr" / "caseTr0.nii.gz"
    if content == "text":
        label.write_text("this is not an image")
    elif content == "png":
        label.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    elif content == "mgh":
        label = root / "labelsTr" / "caseTr0.mgz"
        nib.save(nib.MGHImage(np.zeros((4, 5, 6), np.uint8), np.eye(4)), str(label))
        _set_image(root, "labelsTr/caseTr0.mgz", key="label")
    else:
        label.write_bytes(gzip.compress(b"not a nifti header" * 40))
    message = _error(root)
    assert label.name in message and "training[0]" in message
    assert "not NIfTI" in message or "not a readable NIfTI" in message


def test_deeply_nested_json(tmp_path):
    root = make_site(tmp_path / "s")
    (root / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _error(root)
    nested = 0
    for _ in range(500):
        nested = [nested]
    message = _set_image(make_site(tmp_path / "t"), nested)
    assert "expected a relative file path" in message and len(message) < 800


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "organ": 10**400}, "0..255"),
    ({"background": 0, "organ": -1}, "0..255"),
    ({"background": 0, "organ": 1, "lesion": 1}, "same value"),
])
def test_label_values_out_of_range(tmp_path, labels, expected):
    root = make_site(tmp_path / "s")
    meta = _meta(root)
    meta["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(meta))
    assert expected in _error(root)


def test_name_must_be_text(tmp_path):
    assert "'name' must be a string" in _error(make_site(tmp_path / "s", name={"a": [1]}))


def test_task_mismatch_is_a_dataset_error(tmp_path):
    site = load_site_dataset(_classification_site(tmp_path / "s", [0, 1]))
    task = get_task("segmentation", parse_run_config({"task": "segmentation"}).task_settings())
    with pytest.raises(DatasetError, match="needs label maps"):
        task.prepare_site(site)


# --- item 9: accepted silently -------------------------------------------------------------------
def test_duplicate_entry(tmp_path):
    root = make_site(tmp_path / "s")
    meta = _meta(root)
    meta["training"].append(dict(meta["training"][0]))
    _rewrite(root, meta)
    message = _error(root)
    assert "training[2] repeats the image 'caseTr0_0000.nii.gz' of training[0]" in message


def test_case_in_training_and_test(tmp_path):
    root = make_site(tmp_path / "s")
    meta = _meta(root)
    meta["test"].append(dict(meta["training"][1]))
    _rewrite(root, meta)
    assert "test[1] repeats the image 'caseTr1_0000.nii.gz' of training[1]" in _error(root)


def test_two_cases_with_one_name(tmp_path):
    root = make_site(tmp_path / "s")
    (root / "imagesTs" / "caseTr0_0000.nii.gz").write_bytes((root / "imagesTs" / "caseTs0_0000.nii.gz").read_bytes())
    meta = _meta(root)
    meta["test"][0]["image"] = "imagesTs/caseTr0_0000.nii.gz"
    _rewrite(root, meta)
    assert "repeats the case name 'caseTr0' of training[0]" in _error(root)


def test_4d_image_with_3d_label(tmp_path):
    root = make_site(tmp_path / "s")
    _nifti(root / "imagesTr" / "caseTr0_0000.nii.gz", np.zeros((4, 5, 6, 3), np.int16))
    message = _error(root)
    assert "caseTr0_0000.nii.gz has shape (4, 5, 6, 3)" in message and "3D volume" in message


def test_4d_image_with_one_volume_is_accepted(tmp_path):
    root = make_site(tmp_path / "s")
    _nifti(root / "imagesTr" / "caseTr0_0000.nii.gz", np.zeros((4, 5, 6, 1), np.int16))
    assert isinstance(load_site_dataset(root), SiteDataset)


@pytest.mark.parametrize("cut", [0.5, 0.9, 40])
def test_truncated_gzip_image(tmp_path, cut):
    root = make_site(tmp_path / "s")
    image = root / "imagesTr" / "caseTr1_0000.nii.gz"
    _nifti(image, np.random.default_rng(0).integers(-1000, 1000, (4, 5, 6)).astype(np.int16))
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * cut)] if cut < 1 else data[:cut])
    message = _error(root)
    assert "caseTr1_0000.nii.gz" in message and "training[1]" in message
    assert "truncated" in message or "not a readable NIfTI" in message


def test_truncated_uncompressed_and_classification_images(tmp_path):
    root = _classification_site(tmp_path / "c", [0, 1])
    meta = _meta(root)
    image = root / meta["training"][0]["image"]
    image.write_bytes(image.read_bytes()[:-200])
    assert "truncated" in _error(root) or "not a readable" in _error(root)
    root = make_site(tmp_path / "s", file_ending=".nii")
    raw = root / "imagesTr" / "caseTr0_0000.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([2.0, 2.0, 3.0, 1.0])), str(raw))
    raw.write_bytes(raw.read_bytes()[:-10])
    assert "truncated" in _set_image(root, "imagesTr/caseTr0_0000.nii")


def test_multi_member_gzip_is_not_taken_for_truncated(tmp_path):
    """pigz/bgzip-style files (several gzip members) hold the whole image: accepted."""
    root = make_site(tmp_path / "s")
    image = root / "imagesTr" / "caseTr0_0000.nii.gz"
    raw = gzip.decompress(image.read_bytes())
    image.write_bytes(gzip.compress(raw[:100]) + gzip.compress(raw[100:]))
    site = load_site_dataset(root)
    assert np.array_equal(np.asanyarray(nib.load(str(site.training[0].image)).dataobj),
                          np.arange(120, dtype=np.int16).reshape(4, 5, 6))


@pytest.mark.parametrize("channel, ok", [("PET", False), ("", False), (7, False), ("CTA", False), ("ct", True), ("T2", True),
                                         ("MRI", True), ("t1gd", True), ("T2-FLAIR", True), ("mr0", True)])
def test_unknown_modality(tmp_path, channel, ok):
    root = make_site(tmp_path / "s", channel_names={"0": channel})
    if ok:
        assert load_site_dataset(root).modality == str(channel).upper()
    else:
        message = _error(root)
        assert repr(channel) in message and "not a modality" in message


def test_corrupt_voxels_found_while_caching_are_a_dataset_error(tmp_path):
    """A flipped byte inside the compressed voxels passes the cheap checks; the task's cache finds it."""
    root = _classification_site(tmp_path / "s", [0, 1])
    image = root / "imagesTr" / "caseTr1_0000.nii.gz"
    _nifti(image, np.random.default_rng(1).integers(-1000, 1000, (24, 24, 24)).astype(np.int16))
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    site = load_site_dataset(root)  # header and length are intact: reading every voxel each round costs too much
    task = get_task("classification", parse_run_config({"task": "classification", "spacing": "2,2,3"}).task_settings())
    with pytest.raises(DatasetError, match="could not be read"):
        task.prepare_site(site)
