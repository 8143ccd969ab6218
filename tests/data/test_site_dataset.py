"""load_site_dataset: every validation error names the file or value; a valid dataset loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.site_dataset import DatasetError, load_site_dataset

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_site(root: Path, n_train: int = 2, n_test: int = 1, **overrides) -> Path:
    """A tiny valid segmentation site; ``overrides`` replace dataset.json keys."""
    root.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list] = {"training": [], "test": []}
    for split, key, n in (("Tr", "training", n_train), ("Ts", "test", n_test)):
        for i in range(n):
            case = f"case{split}{i}"
            image = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
            label = np.zeros((4, 5, 6), np.uint8)
            label[1:3, 1:3, 1:4] = 1
            label[2, 2, 2] = 2
            _nifti(root / f"images{split}" / f"{case}_0000.nii.gz", image)
            _nifti(root / f"labels{split}" / f"{case}.nii.gz", label)
            lists[key].append({"image": f"images{split}/{case}_0000.nii.gz", "label": f"labels{split}/{case}.nii.gz"})
    meta = {
        "name": "tiny", "channel_names": {"0": "ct"}, "labels": LABELS, "numTraining": n_train,
        "file_ending": ".nii.gz", **lists,
    }
    meta.update(overrides)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _rewrite(root: Path, meta: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))


def _error(root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_site_dataset(root, **kwargs)
    return str(info.value)


def test_valid_dataset_loads(tmp_path):
    site = load_site_dataset(make_site(tmp_path / "site", n_train=3, n_test=2))
    assert site.kind == "segmentation"
    assert site.modality == "CT"  # upper-cased from channel_names
    assert site.labels == LABELS and site.foreground_labels == {"organ": 1, "lesion": 2}
    assert [c.name for c in site.training] == ["caseTr0", "caseTr1", "caseTr2"]
    assert [c.name for c in site.test] == ["caseTs0", "caseTs1"]
    root = (tmp_path / "site").resolve()
    for case in site.training + site.test:
        assert case.image.is_absolute() and root in case.image.parents and case.image.is_file()
        assert isinstance(case.label, Path) and root in case.label.parents


def test_missing_folder_and_dataset_json(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    message = _error(tmp_path / "empty")
    assert "dataset.json" in message and "missing" in message


def test_invalid_json_names_the_file(tmp_path):
    root = make_site(tmp_path / "s")
    (root / "dataset.json").write_text('{"name": "x", ')
    message = _error(root)
    assert str(root.resolve() / "dataset.json") in message and "not valid JSON" in message
    (root / "dataset.json").write_text("[1, 2]")
    assert "JSON object" in _error(root)


@pytest.mark.parametrize("key", ["name", "channel_names", "labels", "training"])
def test_missing_key_is_named(tmp_path, key):
    root = make_site(tmp_path / "s")
    meta = _meta(root)
    del meta[key]
    _rewrite(root, meta)
    message = _error(root)
    assert f"'{key}'" in message and "dataset.json" in message


@pytest.mark.parametrize("field", ["image", "label"])
def test_missing_file_is_named(tmp_path, field):
    root = make_site(tmp_path / "s")
    rel = _meta(root)["training"][1][field]
    (root / rel).unlink()
    message = _error(root)
    assert rel in message and "training[1]" in message and "does not exist" in message


def test_shape_mismatch_names_both_files(tmp_path):
    root = make_site(tmp_path / "s")
    rel = _meta(root)["training"][0]["label"]
    _nifti(root / rel, np.zeros((4, 5, 7), np.uint8))
    message = _error(root)
    assert Path(rel).name in message and "caseTr0_0000.nii.gz" in message
    assert "(4, 5, 7)" in message and "(4, 5, 6)" in message


def test_affine_mismatch_names_the_label(tmp_path):
    root = make_site(tmp_path / "s")
    rel = _meta(root)["test"][0]["label"]
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    _nifti(root / rel, np.zeros((4, 5, 6), np.uint8), shifted)
    message = _error(root)
    assert Path(rel).name in message and "affine" in message and "test[0]" in message
    # a sub-tolerance difference (float rounding) is accepted
    shifted[0, 3] = 1e-5
    _nifti(root / rel, np.zeros((4, 5, 6), np.uint8), shifted)
    load_site_dataset(root)


def test_undeclared_label_values_are_listed(tmp_path):
    root = make_site(tmp_path / "s")
    rel = _meta(root)["training"][1]["label"]
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, 0, 0], label[1, 1, 1] = 7, 1
    _nifti(root / rel, label)
    message = _error(root)
    assert Path(rel).name in message and "[7]" in message and "[0, 1, 2]" in message


def test_non_integer_label_values_are_refused(tmp_path):
    root = make_site(tmp_path / "s")
    rel = _meta(root)["training"][0]["label"]
    for bad in (1.5, np.nan):
        label = np.zeros((4, 5, 6), np.float32)
        label[1, 1, 1] = bad
        _nifti(root / rel, label)
        message = _error(root)
        assert Path(rel).name in message and "does not declare" in message


def test_paths_escaping_the_folder_are_refused(tmp_path):
    root = make_site(tmp_path / "s")
    outside = tmp_path / "outside_0000.nii.gz"
    _nifti(outside, np.zeros((4, 5, 6), np.int16))
    meta = _meta(root)

    meta["training"][0]["image"] = "../outside_0000.nii.gz"
    _rewrite(root, meta)
    message = _error(root)
    assert "../outside_0000.nii.gz" in message and "escapes" in message

    meta["training"][0]["image"] = str(outside)
    _rewrite(root, meta)
    message = _error(root)
    assert str(outside) in message and "relative" in message

    link = root / "imagesTr" / "link_0000.nii.gz"
    os.symlink(outside, link)
    meta["training"][0]["image"] = "imagesTr/link_0000.nii.gz"
    _rewrite(root, meta)
    message = _error(root)
    assert "imagesTr/link_0000.nii.gz" in message and "escapes" in message

    meta["training"][0]["image"] = "imagesTr/../../outside_0000.nii.gz"
    _rewrite(root, meta)
    assert "escapes" in _error(root)


def test_symlink_inside_the_folder_is_accepted(tmp_path):
    root = make_site(tmp_path / "s")
    meta = _meta(root)
    os.symlink(root / meta["training"][0]["image"], root / "imagesTr" / "alias_0000.nii.gz")
    meta["training"][0]["image"] = "imagesTr/alias_0000.nii.gz"
    _rewrite(root, meta)
    assert load_site_dataset(root).training[0].name == "alias"


def test_empty_training_list(tmp_path):
    root = make_site(tmp_path / "s", training=[])
    message = _error(root)
    assert "'training' list is empty" in message and "dataset.json" in message
    # evaluation-only sites (e.g. the demo's unseen site) are accepted when asked for
    site = load_site_dataset(root, require_training=False)
    assert site.training == () and len(site.test) == 1 and site.kind == "segmentation"


@pytest.mark.parametrize(("where", "index", "says"), [
    ("training", 1, "'training' mixes class indices and label maps"),
    ("test", 0, "'test' labels are of another kind"),
])
def test_class_index_among_label_maps(tmp_path, where, index, says):
    root = make_site(tmp_path / "s")
    meta = _meta(root)
    meta[where][index]["label"] = 1
    _rewrite(root, meta)
    assert says in _error(root)


def _classification_site(root: Path, labels: list) -> Path:
    make_site(root)
    meta = _meta(root)
    meta["labels"] = {"no-lesion": 0, "lesion": 1}
    meta["training"] = [{"image": e["image"], "label": lab} for e, lab in zip(meta["training"], labels)]
    meta["test"] = []
    _rewrite(root, meta)
    return root


def test_classification_dataset_loads(tmp_path):
    site = load_site_dataset(_classification_site(tmp_path / "s", [1, 0]))
    assert site.kind == "classification"
    assert [c.label for c in site.training] == [1, 0]


@pytest.mark.parametrize("bad", [2, -1, 0.5, True, float("nan"), float("inf")])
def test_undeclared_class_index_is_named(tmp_path, bad):
    root = _classification_site(tmp_path / "s", [0, bad])
    message = _error(root)
    assert "training[1]" in message and repr(bad) in message and "[0, 1]" in message


def test_bad_labels_and_channels(tmp_path):
    root = make_site(tmp_path / "s", labels={"background": "zero"})
    assert "'labels' must map names to integer values" in _error(root)
    root = make_site(tmp_path / "t", channel_names={"0": "CT", "1": "T2"})
    assert "channel 1: file" in _error(root) and "does not exist" in _error(root)  # no <case>_0001 file
    root = make_site(tmp_path / "v", channel_names={"0": "CT", "2": "PET"})
    assert "channel indices" in _error(root)
    root = make_site(tmp_path / "u", file_ending=".mha")
    assert "'.mha'" in _error(root)


def test_segmentation_needs_background(tmp_path):
    root = make_site(tmp_path / "s", labels={"organ": 1, "lesion": 2, "other": 0})
    load_site_dataset(root)
    root = make_site(tmp_path / "t", labels={"organ": 1, "lesion": 2, "all": 3})
    # label maps hold 0 which is now undeclared: the geometry check names the value first
    assert "[0]" in _error(root)
    assert "background = 0" in _error(root, check_geometry=False)
