"""``fedimaging import``: MSD (3D, 4D), nnU-Net v2 multi-channel, plain folders, bad cases, PHI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.nifti1 import Nifti1Extension, extension_codes

from data_prep.import_cli import main as import_main
from data_prep.nifti_import import import_dataset
from data_prep.site_dataset import load_site_dataset
from tests.prep.conftest import all_output_bytes, tree_digest

def _find_realdata() -> Path:
    """``../shared/realdata`` beside the repo (or beside a folder holding worktrees of it)."""
    for parent in Path(__file__).resolve().parents[2].parents:
        if (parent / "shared" / "realdata").is_dir():
            return parent / "shared" / "realdata" / "msd_hippocampus"
    return Path(__file__).resolve().parents[3] / "shared" / "realdata" / "msd_hippocampus"


REALDATA = _find_realdata()
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
SHAPE = (8, 7, 6)


def _save(path: Path, data: np.ndarray, affine=AFFINE, header=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine, header=header), str(path))
    return path


def _image(seed: int, channels: int = 1, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = SHAPE + ((channels,) if channels > 1 else ())
    return (rng.random(shape) * 200 + 10).astype(dtype)


def _label(seed: int, top: int = 2) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:5, 1 + seed % 2:4] = 1
    if top >= 2:
        lab[5:7, 1:3, 2:4] = 2
    return lab


def _msd(root: Path, n: int, channels: int = 1) -> Path:
    training = []
    for i in range(n):
        _save(root / "imagesTr" / f"pat_{i:03d}.nii.gz", _image(i, channels))
        _save(root / "labelsTr" / f"pat_{i:03d}.nii.gz", _label(i))
        training.append({"image": f"./imagesTr/pat_{i:03d}.nii.gz", "label": f"./labelsTr/pat_{i:03d}.nii.gz"})
    modality = {"0": "T1"} if channels == 1 else {str(c): f"mr{c}" for c in range(channels)}
    (root / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": modality, "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n, "training": training, "test": []}))
    return root


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_msd_3d_import_writes_a_valid_site_dataset_with_the_source_voxels(tmp_path):
    src = _msd(tmp_path / "in", 4)
    before = tree_digest(src)
    result = import_dataset(src, tmp_path / "out", test_fraction=0.25, seed=1)
    assert result.exit_code == 0 and result.report["summary"]["converted"] == 4
    ds = load_site_dataset(tmp_path / "out")
    assert (len(ds.training), len(ds.test)) == (3, 1)
    assert ds.labels == {"background": 0, "a": 1, "b": 2} and ds.extra["channel_names"] == {"0": "T1"}
    mapping = json.loads((tmp_path / "out" / "private" / "mapping.json").read_text())
    for case in ds.training + ds.test:
        source = src / mapping[case.name]["images"][0]
        np.testing.assert_array_equal(_voxels(case.image), _voxels(source))
        np.testing.assert_allclose(nib.load(str(case.image)).affine, AFFINE)
        np.testing.assert_array_equal(_voxels(case.label), _voxels(src / mapping[case.name]["label"]))
    assert tree_digest(src) == before  # INPUT only read
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert {e["status"] for e in report["cases"]} == {"converted"}
    assert "pat_" not in json.dumps(report) + (tmp_path / "out" / "dataset.json").read_text()


def test_msd_4d_channels_become_one_file_per_channel(tmp_path):
    src = _msd(tmp_path / "in", 2, channels=3)
    result = import_dataset(src, tmp_path / "out")
    assert result.exit_code == 0
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "mr0", "1": "mr1", "2": "mr2"}
    mapping = json.loads((tmp_path / "out" / "private" / "mapping.json").read_text())
    entry = meta["training"][0]
    case = Path(entry["image"]).name[: -len("_0000.nii.gz")]
    source = _voxels(src / mapping[case]["images"][0])
    for c in range(3):
        written = _voxels(tmp_path / "out" / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        np.testing.assert_array_equal(written, source[..., c])
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert list(fingerprint["channel_names"].values()) == ["mr0", "mr1", "mr2"]


def _nnunet(root: Path, n: int, drop_channel_of: int | None = None) -> Path:
    for i in range(n):
        for c in range(2):
            if not (i == drop_channel_of and c == 1):
                _save(root / "imagesTr" / f"br_{i:03d}_{c:04d}.nii.gz", _image(10 * i + c))
        _save(root / "labelsTr" / f"br_{i:03d}.nii.gz", _label(i, top=1))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Brain", "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_multichannel_and_a_missing_channel_is_reported_and_skipped(tmp_path, capsys):
    src = _nnunet(tmp_path / "in", 3, drop_channel_of=1)
    code = import_main([str(src), str(tmp_path / "out"), "--workers", "2"])
    assert code == 3  # some cases rejected, the others written
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    rejected = [e for e in report["cases"] if e["status"] == "rejected"]
    assert [e["reason"] for e in rejected] == ["missing_channel"]
    assert "br_001" in capsys.readouterr().out  # the site's engineer sees which source case
    ds = load_site_dataset(tmp_path / "out")
    assert len(ds.training) == 2 and ds.extra["channel_names"] == {"0": "T2", "1": "ADC"}
    mapping = json.loads((tmp_path / "out" / "private" / "mapping.json").read_text())
    for case in ds.training:
        assert mapping[case.name]["source_case"] in ("br_000", "br_002")
        for c in range(2):
            written = _voxels(tmp_path / "out" / "imagesTr" / f"{case.name}_{c:04d}.nii.gz")
            np.testing.assert_array_equal(written, _voxels(src / mapping[case.name]["images"][c]))


def test_plain_folders_need_a_modality_and_match_labels_by_name(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(3):
        _save(images / f"scan{i}.nii.gz", _image(i, dtype=np.int16))
    for i in range(2):
        _save(labels / f"scan{i}.nii.gz", _label(i, top=1))
    assert import_main([str(images), str(tmp_path / "o1"), "--labels", str(labels)]) == 2
    assert "--modality" in capsys.readouterr().err
    result = import_dataset(images, tmp_path / "out", labels=labels, modality="CT")
    ds = load_site_dataset(tmp_path / "out")
    assert result.exit_code == 0 and (len(ds.training), len(ds.test)) == (2, 1)
    assert ds.modality == "CT" and ds.test[0].label is None
    assert _voxels(ds.training[0].image).dtype == np.int16


def test_bad_cases_are_reported_with_reason_codes_and_the_rest_imported(tmp_path):
    src = _msd(tmp_path / "in", 6)
    _save(src / "labelsTr" / "pat_001.nii.gz", np.zeros((8, 7, 5), np.uint8))  # shape mismatch
    _save(src / "labelsTr" / "pat_002.nii.gz", _label(2), affine=np.diag([1.5, 1.2, 2.6, 1.0]))  # affine
    bad = _label(3)
    bad[0, 0, 0] = 7
    _save(src / "labelsTr" / "pat_003.nii.gz", bad)  # undeclared label value
    nan = _image(4)
    nan[1, 1, 1] = np.nan
    _save(src / "imagesTr" / "pat_004.nii.gz", nan)  # non-finite voxel
    result = import_dataset(src, tmp_path / "out")
    assert result.exit_code == 3
    mapping = json.loads((tmp_path / "out" / "private" / "mapping.json").read_text())
    reasons = {mapping[e["case"]]["source_case"]: e.get("reason") for e in result.report["cases"]}
    assert reasons == {"pat_000": None, "pat_001": "label_shape_mismatch", "pat_002": "label_geometry_mismatch",
                       "pat_003": "undeclared_label_value", "pat_004": "non_finite_voxels", "pat_005": None}
    assert "pat_003.nii.gz" in result.table and "[7]" in result.table
    assert len(load_site_dataset(tmp_path / "out").training) == 2


def test_a_4d_image_with_the_wrong_channel_count_is_rejected(tmp_path):
    src = _msd(tmp_path / "in", 3, channels=2)
    _save(src / "imagesTr" / "pat_001.nii.gz", _image(1, channels=3))
    result = import_dataset(src, tmp_path / "out")
    reasons = sorted(str(e.get("reason")) for e in result.report["cases"])
    assert result.exit_code == 3 and reasons == ["None", "None", "channel_count_mismatch"]
    assert "pat_001.nii.gz" in result.table and "3 channel(s)" in result.table


def test_reruns_are_incremental_and_follow_changes(tmp_path):
    src = _msd(tmp_path / "in", 3)
    first = import_dataset(src, tmp_path / "out")
    names = sorted(e["case"] for e in first.report["cases"])
    again = import_dataset(src, tmp_path / "out")
    assert again.report["summary"]["unchanged"] == 3
    _save(src / "imagesTr" / "pat_002.nii.gz", _image(99))
    third = import_dataset(src, tmp_path / "out")
    assert third.report["summary"]["unchanged"] == 2 and sorted(e["case"] for e in third.report["cases"]) == names


def test_output_inside_input_is_refused(tmp_path, capsys):
    src = _msd(tmp_path / "in", 1)
    assert import_main([str(src), str(src / "out")]) == 2
    assert "inside" in capsys.readouterr().err and not (src / "out").exists()


def test_a_folder_the_importer_does_not_own_is_never_written(tmp_path, capsys):
    """An nnU-Net dataset given as OUTPUT keeps its dataset.json and images, even with --force."""
    src = _msd(tmp_path / "in", 2)
    foreign = _msd(tmp_path / "nnunet", 1)
    before = tree_digest(foreign)
    for extra in ([], ["--force"]):
        assert import_main([str(src), str(foreign), *extra]) == 2
        assert "not written by fedimaging" in capsys.readouterr().err
    assert tree_digest(foreign) == before


def test_nothing_importable_never_empties_an_existing_dataset(tmp_path):
    src = _msd(tmp_path / "in", 2)
    assert import_dataset(src, tmp_path / "out").exit_code == 0
    before = tree_digest(tmp_path / "out")
    for i in range(2):  # every label now has another shape than its image
        _save(src / "labelsTr" / f"pat_{i:03d}.nii.gz", np.zeros((8, 7, 5), np.uint8))
    result = import_dataset(src, tmp_path / "out")
    assert result.exit_code == 3 and result.nothing_converted
    assert tree_digest(tmp_path / "out") == before
    assert len(load_site_dataset(tmp_path / "out").training) == 2


def test_unknown_channel_names_are_refused_before_writing(tmp_path, capsys):
    src = _msd(tmp_path / "in", 1)
    meta = json.loads((src / "dataset.json").read_text())
    meta["modality"] = {"0": "PET"}
    (src / "dataset.json").write_text(json.dumps(meta))
    assert import_main([str(src), str(tmp_path / "out")]) == 2
    assert "'PET'" in capsys.readouterr().err and not (tmp_path / "out").exists()


PLANTED = ["Doe^Jonathan", "MRN7734129", "19610423", "Saint Elsewhere", "ACC55120987", "Kildare^Xavier"]


def test_planted_identifiers_never_reach_an_output_byte_outside_private(tmp_path):
    src = tmp_path / "in"
    header = nib.Nifti1Header()
    header["descrip"] = b"Doe^Jonathan 19610423"
    header["aux_file"] = b"MRN7734129"
    header["intent_name"] = b"ACC55120987"
    header["db_name"] = b"Saint Elsewhere"
    json_code = extension_codes.code.get("json", 44) if hasattr(extension_codes, "code") else 44
    for code, text in ((2, b"(0010,0010) PN Doe^Jonathan (0010,0020) LO MRN7734129"),
                       (4, b"<AFNI_attributes HISTORY_NOTE='Kildare^Xavier 19610423'/>"),
                       (6, b"patient Doe^Jonathan Saint Elsewhere"),
                       (json_code, json.dumps({"PatientName": "Doe^Jonathan", "AccessionNumber": "ACC55120987"}).encode())):
        header.extensions.append(Nifti1Extension(code, text))
    img = _save(src / "imagesTr" / "pat_000.nii.gz", _image(0), header=header)
    _save(src / "labelsTr" / "pat_000.nii.gz", _label(0), header=header.copy())
    (src / "imagesTr" / "pat_000.json").write_text(json.dumps({
        "PatientName": "Doe^Jonathan", "PatientID": "MRN7734129", "PatientBirthDate": "19610423",
        "InstitutionName": "Saint Elsewhere", "ReferringPhysicianName": "Kildare^Xavier",
        "AcquisitionDateTime": "2023-09-17T10:00:00", "EchoTime": 0.03, "Manufacturer": "Siemens"}))
    (src / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "training": [{"image": "./imagesTr/pat_000.nii.gz", "label": "./labelsTr/pat_000.nii.gz"}], "test": []}))
    result = import_dataset(src, tmp_path / "out")
    assert result.exit_code == 0
    outside = [(p, data) for p, data in all_output_bytes(tmp_path / "out") if "private" not in p.parts]
    assert any(p.name.endswith(".nii.gz") for p, _ in outside)
    for path, data in outside:
        for needle in PLANTED + ["2023-09-17"]:
            assert needle.encode() not in data, f"{needle!r} leaked into {path}"
    written = nib.load(str(next((tmp_path / "out" / "imagesTr").iterdir())))
    assert len(written.header.extensions) == 0
    sidecar = json.loads(next((tmp_path / "out" / "sidecars").iterdir()).read_text())
    assert sidecar["acquisition"] == {"EchoTime": 0.03, "Manufacturer": "Siemens"}  # whitelist kept


def _real_msd_subset(tmp_path: Path, cases: list[str]) -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA} (../shared/realdata beside the repo)")
    root = tmp_path / "hippo"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for c in cases:
            shutil.copy(REALDATA / sub / f"{c}.nii.gz", root / sub)
    meta = json.loads((REALDATA / "dataset.json").read_text())
    meta["training"] = [e for e in meta["training"] if Path(e["image"]).name[:-7] in cases]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_real_hippocampus_mixed_uint8_and_float32_storage(tmp_path):
    src = _real_msd_subset(tmp_path, ["hippocampus_001", "hippocampus_003"])  # uint8, float32
    result = import_dataset(src, tmp_path / "out")
    assert result.exit_code == 0
    dtypes = sorted(e["dtype"] for e in result.report["cases"])
    assert dtypes == ["float32", "uint8"]
    ds = load_site_dataset(tmp_path / "out")
    mapping = json.loads((tmp_path / "out" / "private" / "mapping.json").read_text())
    for case in ds.training:
        np.testing.assert_array_equal(_voxels(case.image), _voxels(src / mapping[case.name]["images"][0]))
    assert ds.labels == {"background": 0, "Anterior": 1, "Posterior": 2}
