"""The ``fedimaging prep`` command: outputs per DESIGN 3.4, labels, fingerprint, exit codes,
incremental re-runs, parallel workers, and inputs left untouched."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_prep.prep import prepare_site
from data_prep.prep_cli import main
from data_prep.site_dataset import load_site_dataset
from tests.prep.conftest import pattern_volume, prepared_images, tree_digest, write_volume

AFFINE = np.diag([0.9, 0.9, 2.0, 1.0])
SHAPE = (10, 8, 4)


def _uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{1000 + i}"


@pytest.fixture
def site(tmp_path):
    """Six CT series; labels (by UID in the file name) for series 0-3, a bad label for 4."""
    src, labels = tmp_path / "dicom", tmp_path / "labels"
    labels.mkdir()
    for i in range(6):
        write_volume(src / f"s{i}", AFFINE, pattern_volume(SHAPE, i), series_uid=_uid(i))
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = (rng.random(SHAPE) > 0.7).astype(np.uint8) * (1 + i % 2)
        nib.save(nib.Nifti1Image(lab, AFFINE), labels / f"seg_{_uid(i)}.nii.gz")
    # series 3: label saved in another axis order (x flipped), matched via mapping.json
    lab3 = np.zeros(SHAPE, np.uint8)
    lab3[1, 2, 3] = 1
    flipped = AFFINE @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(lab3[::-1].copy(), flipped), labels / "patient3.nii.gz")
    (labels / "mapping.json").write_text(json.dumps({"patient3.nii.gz": _uid(3)}))
    # series 4: label on a shifted grid -> rejected
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE @ np.diag([1, 1, 1.5, 1.0])),
             labels / f"{_uid(4)}.nii.gz")
    return src, labels, lab3


def _read(out, name):
    return json.loads((out / name).read_text())


def test_full_site_dataset(tmp_path, site):
    src, labels, lab3 = site
    before = tree_digest(src)
    out = tmp_path / "out"
    code = main([str(src), str(out), "--labels", str(labels), "--workers", "1", "--quiet"])
    assert code == 3  # the bad label is a rejection; everything else still written
    assert tree_digest(src) == before  # inputs untouched

    dataset = _read(out, "dataset.json")
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert dataset["numTraining"] == len(dataset["training"]) == 4
    assert len(dataset["test"]) == 2 and all(e["label"] is None for e in dataset["test"])
    for e in dataset["training"]:
        assert e["image"].startswith("imagesTr/") and e["image"].endswith("_0000.nii.gz")
        assert e["label"] == "labelsTr/" + e["image"][9:].replace("_0000.nii.gz", ".nii.gz")
    loaded = load_site_dataset(out)  # the ClientApp's loader accepts it
    assert len(loaded.training) == 4 and loaded.kind == "segmentation"

    report = _read(out, "prep_report.json")
    statuses = [(s["status"], s.get("label"), s.get("label_reason")) for s in report["series"]]
    assert sorted(statuses, key=str) == sorted(
        [("converted", "matched", None)] * 4 + [("converted", "rejected", "label_geometry_mismatch"),
                                                ("converted", None, None)], key=str)
    assert all(s["files"] == SHAPE[2] for s in report["series"])

    # The reoriented label lands on the image grid voxel for voxel.
    mapping = _read(out, "private/mapping.json")
    case3 = next(c for c, m in mapping.items() if m["series_uid"] == _uid(3))
    lab = nib.load(str(out / f"labelsTr/{case3}.nii.gz"))
    img = nib.load(str(out / f"imagesTr/{case3}_0000.nii.gz"))
    np.testing.assert_allclose(lab.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), lab3)

    fp = _read(out, "fingerprint.json")
    stats = fp["statistics"]
    assert fp["counts"]["cases"] == 6
    assert stats["spacing_mm"]["z"]["median"] == pytest.approx(2.0)
    all_vox = np.concatenate([nib.load(str(p)).get_fdata().ravel() for p in prepared_images(out)])
    assert stats["intensity"]["mean"] == pytest.approx(all_vox.mean())
    hist = stats["intensity"]["histogram"]
    assert sum(hist["counts"]) + hist["underflow"] + hist["overflow"] == all_vox.size
    expected, _ = np.histogram(all_vox, bins=hist["bin_edges"])
    assert hist["counts"] == expected.tolist()
    lab_counts = {}
    for p in sorted(out.glob("labelsTr/*.nii.gz")):
        v, n = np.unique(np.asanyarray(nib.load(str(p)).dataobj), return_counts=True)
        for a, b in zip(v, n):
            lab_counts[str(int(a))] = lab_counts.get(str(int(a)), 0) + int(b)
    assert stats["label_voxels"] == lab_counts


def test_fingerprint_omits_statistics_below_five_cases(tmp_path):
    for i in range(2):
        write_volume(tmp_path / "in" / str(i), AFFINE, pattern_volume(SHAPE, i))
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 0
    fp = _read(tmp_path / "out", "fingerprint.json")
    assert fp["statistics"] is None and fp["counts"]["cases"] == 2


def test_incremental_rerun_and_force(tmp_path, site):
    src, labels, _ = site
    out = tmp_path / "out"
    prepare_site(src, out, labels=labels)
    mtimes = {p.name: p.stat().st_mtime_ns for p in prepared_images(out)}
    result = prepare_site(src, out, labels=labels)
    assert result.report["summary"]["unchanged"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in prepared_images(out)} == mtimes
    # change one series: only it is converted again
    write_volume(src / "s5", AFFINE, pattern_volume(SHAPE, 99), series_uid=_uid(5))
    result = prepare_site(src, out, labels=labels)
    assert result.report["summary"]["unchanged"] == 5
    changed = [n for n, t in mtimes.items() if (out / "imagesTr" / n).exists() and
               (out / "imagesTr" / n).stat().st_mtime_ns != t or
               (out / "imagesTs" / n).exists() and (out / "imagesTs" / n).stat().st_mtime_ns != t]
    assert len(changed) == 1
    result = prepare_site(src, out, labels=labels, force=True)
    assert result.report["summary"]["unchanged"] == 0
    # a series removed from the input disappears from the dataset
    for p in (src / "s5").iterdir():
        p.unlink()
    prepare_site(src, out, labels=labels)
    assert len(prepared_images(out)) == 5
    assert len(_read(out, "dataset.json")["test"]) == 1


def test_parallel_workers_give_identical_outputs(tmp_path, site):
    src, labels, _ = site
    prepare_site(src, tmp_path / "one", labels=labels, workers=1)
    (tmp_path / "two" / "private").mkdir(parents=True)
    # same secret -> same pseudonyms, so outputs can be compared byte for byte
    (tmp_path / "two/private/site_secret.key").write_bytes(
        (tmp_path / "one/private/site_secret.key").read_bytes())
    os.chmod(tmp_path / "two/private/site_secret.key", 0o600)
    prepare_site(src, tmp_path / "two", labels=labels, workers=2, force=True)
    for sub in ("dataset.json", "imagesTr", "labelsTr", "imagesTs", "sidecars"):
        a, b = tmp_path / "one" / sub, tmp_path / "two" / sub
        files_a = sorted(p.relative_to(a) for p in a.rglob("*")) if a.is_dir() else [None]
        files_b = sorted(p.relative_to(b) for p in b.rglob("*")) if b.is_dir() else [None]
        assert files_a == files_b
        for rel in files_a:
            pa, pb = (a / rel, b / rel) if rel else (a, b)
            assert pa.read_bytes() == pb.read_bytes(), pa


def test_usage_errors_exit_2(tmp_path, capsys):
    write_volume(tmp_path / "in", AFFINE, pattern_volume(SHAPE))
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert main([str(tmp_path / "in"), str(tmp_path / "in" / "out")]) == 2
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--tilt", "sideways"]) == 2
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--workers", "0"]) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.docx").write_text("x")
    assert main([str(tmp_path / "in"), str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "in" / "out").exists()
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert "converted 1" in capsys.readouterr().out


def test_mapping_can_hold_labelled_cases_out_for_testing(tmp_path, capsys):
    """mapping.json / mapping.csv "split": "test" -> imagesTs + labelsTs, kept as labelled test cases."""
    src, labels = tmp_path / "dicom", tmp_path / "labels"
    labels.mkdir()
    grids = {}
    for i in range(4):
        write_volume(src / f"s{i}", AFFINE, pattern_volume(SHAPE, i), series_uid=_uid(i))
        grids[i] = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.uint8)
        nib.save(nib.Nifti1Image(grids[i], AFFINE), labels / f"lab{i}.nii.gz")
    (labels / "mapping.json").write_text(json.dumps({
        "lab0.nii.gz": _uid(0),
        "lab1.nii.gz": {"series_uid": _uid(1), "split": "train"},
        "lab2.nii.gz": {"series_uid": _uid(2), "split": "test"},
    }))
    (labels / "mapping.csv").write_text(f"file,series_uid,split\nlab3.nii.gz,{_uid(3)},test\n")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--labels", str(labels), "--workers", "1", "--quiet"]) == 0
    dataset = _read(out, "dataset.json")
    assert dataset["numTraining"] == 2 and dataset["numTest"] == 2
    assert all(e["image"].startswith("imagesTs/") and e["label"].startswith("labelsTs/")
               for e in dataset["test"])
    loaded = load_site_dataset(out)
    assert len(loaded.training) == 2 and all(c.label is not None for c in loaded.test)
    mapping = _read(out, "private/mapping.json")
    held_out = {m["series_uid"] for c, m in mapping.items() if (out / f"labelsTs/{c}.nii.gz").is_file()}
    assert held_out == {_uid(2), _uid(3)}
    # moving a case back to training re-converts only that case, and nothing stale stays behind
    (labels / "mapping.csv").write_text(f"file,series_uid,split\nlab3.nii.gz,{_uid(3)},\n")
    result = prepare_site(src, out, labels=labels)
    assert result.report["summary"]["unchanged"] == 3
    assert sorted(p.parent.name for p in out.glob("labels*/*.nii.gz")) == ["labelsTr"] * 3 + ["labelsTs"]
    assert len(list(out.glob("images*/*.nii.gz"))) == 4

    (labels / "mapping.json").write_text(json.dumps({"lab2.nii.gz": {"series_uid": _uid(2), "split": "validation"}}))
    assert main([str(src), str(out), "--labels", str(labels), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mapping.json" in err and "validation" in err
