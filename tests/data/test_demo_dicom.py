"""The demo's real path: per-scanner DICOM, converted by prep, equal to what the generator made.

The expected volumes are computed here independently of the DICOM writer and of prep: the
generator is called again for each case and both sides are brought to RAS with nibabel's
``as_closest_canonical`` before comparing voxels and affines.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from app.cli import main as cli_main
from data_prep.demo import (
    DEMO_PROFILES,
    UNSEEN_SITE,
    scaled_profile,
    synthesize_case,
    write_demo_site,
)
from data_prep.prep import prepare_site
from data_prep.site_dataset import load_site_dataset

SEED, SIZE = 7, "small"
MANUFACTURERS = {"site-a": "GE MEDICAL SYSTEMS", "site-b": "SIEMENS", "site-c": "Philips",
                 UNSEEN_SITE: "TOSHIBA"}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every demo site (small, seed 7): (site dataset, the DICOM tree it was prepped from)."""
    out = tmp_path_factory.mktemp("demo")
    return {site: (write_demo_site(out / site, site, SEED, size=SIZE, keep_dicom=out / "dicom" / site),
                   out / "dicom" / site) for site in DEMO_PROFILES}


def _generated(site: str, case_index: int):
    """The generator's own (image, label, affine) for one case, as the demo loop draws it."""
    profile = scaled_profile(DEMO_PROFILES[site], SIZE)
    rng = np.random.default_rng([SEED, list(DEMO_PROFILES).index(site), case_index])
    return synthesize_case(profile, rng, bool(rng.random() < profile.lesion_prevalence))


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asanyarray(img.dataobj), img.affine


@pytest.mark.parametrize("site", list(DEMO_PROFILES))
def test_prepped_voxels_and_labels_equal_the_generated_ones(sites, site):
    root, _ = sites[site]
    profile = scaled_profile(DEMO_PROFILES[site], SIZE)
    dataset = load_site_dataset(root, require_training=site != UNSEEN_SITE)
    assert (len(dataset.training), len(dataset.test)) == (profile.n_train, profile.n_test)
    source = json.loads((root / "private" / "mapping.json").read_text())
    seen = set()
    for split, cases in (("train", dataset.training), ("test", dataset.test)):
        for case in cases:
            index = int(source[case.name]["patient_id"].rsplit("_", 1)[1])  # DEMO-sitea_003 -> 3
            seen.add(index)
            assert (index < profile.n_train) == (split == "train")  # the old split, labels kept
            image, label, affine = _generated(site, index)
            img, lab = nib.load(str(case.image)), nib.load(str(case.label))
            assert img.get_data_dtype() == np.int16
            got, got_affine = _canonical(np.asanyarray(img.dataobj), img.affine)
            want, want_affine = _canonical(image, affine)
            np.testing.assert_allclose(got_affine, want_affine, atol=1e-4)
            np.testing.assert_array_equal(got, want)
            got_label, got_label_affine = _canonical(np.asanyarray(lab.dataobj), lab.affine)
            np.testing.assert_allclose(got_label_affine, want_affine, atol=1e-4)
            np.testing.assert_array_equal(got_label, _canonical(label, affine)[0])
    assert seen == set(range(profile.n_train + profile.n_test))


def _headers(dicom_tree: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((dicom_tree / "images").rglob("*.dcm"))]


def test_demo_dicom_looks_like_each_sites_scanner(sites):
    syntaxes, planes = set(), {}
    manufacturers = {}
    for site, (_, tree) in sites.items():
        profile = scaled_profile(DEMO_PROFILES[site], SIZE)
        headers = _headers(tree)
        assert len({h.SeriesInstanceUID for h in headers}) == profile.n_train + profile.n_test
        manufacturers[site] = {(h.Manufacturer, h.ManufacturerModelName) for h in headers}
        assert len(manufacturers[site]) == 1
        for h in headers:
            assert float(h.SliceThickness) == pytest.approx(profile.spacing[2])
            assert str(h.PatientName).startswith("DEMO^") and "PatientBirthDate" not in h
            assert (h.BitsAllocated, h.PixelRepresentation) == (16, 1)  # int16
            if profile.modality == "CT":
                assert (float(h.RescaleSlope), float(h.RescaleIntercept)) == (1.0, -1024.0)
        syntaxes |= {h.file_meta.TransferSyntaxUID for h in headers}
        iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        planes[site] = "axial" if abs(normal[2]) > 0.9 else "other"
    for site, name in MANUFACTURERS.items():
        assert {m for m, _ in manufacturers[site]} == {name}
    assert len({m for ms in manufacturers.values() for m, _ in ms}) == len(sites)
    assert "other" in planes.values()  # at least one site acquired non-axially (site-b: coronal)
    assert {RLELossless, JPEG2000Lossless, ExplicitVRLittleEndian} <= syntaxes


def _voxels(dataset) -> list[bytes]:
    return sorted(np.asanyarray(nib.load(str(c.image)).dataobj).tobytes() for c in dataset.training)


def test_kept_dicom_can_be_prepped_by_hand(sites, tmp_path):
    root, tree = sites["site-b"]
    result = prepare_site(tree / "images", tmp_path / "again", labels=tree / "labels")
    assert result.exit_code == 0
    again = load_site_dataset(tmp_path / "again")
    demo = load_site_dataset(root)
    assert (len(again.training), len(again.test)) == (len(demo.training), len(demo.test))
    # another (random) site secret gives other case names, never other voxels
    assert _voxels(again) == _voxels(demo)


def test_demo_data_command_preps_every_series(tmp_path, capsys):
    out = tmp_path / "federation"
    assert cli_main(["demo-data", str(out), "--sites", "2", "--size", SIZE, "--seed", "3",
                     "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["site-a", "site-b", UNSEEN_SITE]
    for site in ("site-a", "site-b", UNSEEN_SITE):
        assert f"{site}: {out / site}" in printed
        profile = scaled_profile(DEMO_PROFILES[site], SIZE)
        summary = json.loads((out / site / "prep_report.json").read_text())["summary"]
        assert summary["series"] == summary["converted"] == profile.n_train + profile.n_test
        assert summary["rejected"] == summary["labels_rejected"] == summary["unreadable_files"] == 0
        dataset = load_site_dataset(out / site, require_training=site != UNSEEN_SITE)
        assert (len(dataset.training), len(dataset.test)) == (profile.n_train, profile.n_test)
    # a second run keeps what is there; --keep-dicom on a new site keeps its DICOM tree
    assert cli_main(["demo-data", str(out), "--sites", "1", "--size", SIZE, "--seed", "3",
                     "--no-unseen", "--keep-dicom"]) == 0
    assert "already there" in capsys.readouterr().out and not (out / "dicom").exists()


def _generate(target: str) -> None:
    write_demo_site(Path(target), "site-c", seed=2, size=SIZE)


def test_sites_generated_concurrently_give_one_complete_dataset(tmp_path):
    target = tmp_path / "site-c"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_generate, args=(str(target),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    load_site_dataset(target)
    assert [p.name for p in tmp_path.iterdir()] == ["site-c"]  # no staging or temporary folders left
