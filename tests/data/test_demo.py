"""Synthetic demo generator: seeded and order-independent, sites that differ, atomic output.

(The DICOM round trip itself is checked in ``test_demo_dicom.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep import demo
from data_prep.demo import DEMO_PROFILES, UNSEEN_SITE, scaled_profile, write_demo_site
from data_prep.site_dataset import load_site_dataset

SMALL = "small"


def _site(out: Path, site: str, seed: int, task: str = "segmentation") -> Path:
    return write_demo_site(out / task / site, site, seed, task=task, size=SMALL)


def _volumes(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every NIfTI of a site by relative path: (voxel array as stored, affine)."""
    out = {}
    for path in sorted(root.rglob("*.nii.gz")):
        img = nib.load(str(path))
        out[str(path.relative_to(root))] = (np.asanyarray(img.dataobj), img.affine)
    return out


def _assert_same_site(a: Path, b: Path) -> None:
    va, vb = _volumes(a), _volumes(b)
    assert sorted(va) == sorted(vb) and va
    for name in va:
        assert va[name][0].dtype == vb[name][0].dtype, name
        assert np.array_equal(va[name][0], vb[name][0]), name
        assert np.array_equal(va[name][1], vb[name][1]), name
    assert json.loads((a / "dataset.json").read_text()) == json.loads((b / "dataset.json").read_text())


def test_same_seed_same_data_in_any_generation_order(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for site in ("site-a", "site-c"):
        _site(first, site, seed=11)
    for site in ("site-c", "site-a"):  # reversed order, fresh process-level state in between
        np.random.seed(123)
        _site(second, site, seed=11)
    for site in ("site-a", "site-c"):
        _assert_same_site(first / "segmentation" / site, second / "segmentation" / site)


def test_different_seed_gives_different_data(tmp_path):
    a = _volumes(_site(tmp_path / "s1", "site-b", seed=1))
    b = _volumes(_site(tmp_path / "s2", "site-b", seed=2))
    # case names are pseudonyms of the (seeded) series: compare the cases in list order
    images_a = [v for k, v in a.items() if k.startswith("images")]
    images_b = [v for k, v in b.items() if k.startswith("images")]
    assert images_a and len(images_a) == len(images_b)
    assert not set(a) & set(b)
    for (va, _), (vb, _) in zip(images_a, images_b):
        assert va.shape == vb.shape  # same scanner geometry
        assert not np.array_equal(va, vb)


_OPPOSITE = dict(zip("RLAPSI", "LRPAIS"))


def _corner_median(image: np.ndarray) -> float:
    return float(np.median(image[:3, :3, :3]))


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict[str, Path]:
    """Every demo site (small), seed 5, generated once for the profile tests."""
    out = tmp_path_factory.mktemp("federation")
    return {site: _site(out, site, seed=5) for site in DEMO_PROFILES}


@pytest.mark.parametrize("site", list(DEMO_PROFILES))
def test_site_matches_its_scanner_profile(federation, site):
    profile = scaled_profile(DEMO_PROFILES[site], SMALL)
    root = federation[site]
    dataset = load_site_dataset(root, require_training=site != UNSEEN_SITE)
    assert dataset.modality == profile.modality and dataset.kind == "segmentation"
    assert len(dataset.training) == min(DEMO_PROFILES[site].n_train, 4) == profile.n_train
    assert len(dataset.test) == min(DEMO_PROFILES[site].n_test, 2) == profile.n_test
    for case in dataset.training + dataset.test:
        img = nib.load(str(case.image))
        assert np.allclose(img.header.get_zooms()[:3], profile.spacing)
        # prep keeps the DICOM rows and columns; the slice axis follows the slice normal (dcm2niix)
        codes = nib.aff2axcodes(img.affine)
        assert codes[:2] == tuple(profile.orientation[:2])
        assert codes[2] in {profile.orientation[2], _OPPOSITE[profile.orientation[2]]}
        assert np.allclose(np.array(img.shape) * profile.spacing, profile.fov_mm, atol=max(profile.spacing))
        image = np.asanyarray(img.dataobj).astype(np.float64)
        if profile.modality == "CT":
            # air outside the body shows the site's calibration: scale * -1000 HU + offset
            expected_air = profile.scale * -1000.0 + profile.offset
            assert abs(_corner_median(image) - expected_air) < 2 * profile.noise_sd
        else:
            assert image.min() >= 0.0 and img.get_data_dtype() == np.int16  # MR stored as integers
            assert _corner_median(image) < 2 * profile.noise_sd  # MR air is dark, not -1000
        label = np.asanyarray(nib.load(str(case.label)).dataobj)
        assert set(np.unique(label).tolist()) <= {0, 1, 2}
        assert (label == 1).any()  # every case has the organ


def test_sites_differ_from_each_other(federation):
    seen = {}
    for site in DEMO_PROFILES:
        dataset = load_site_dataset(federation[site], require_training=site != UNSEEN_SITE)
        img = nib.load(str((dataset.training + dataset.test)[0].image))
        seen[site] = (tuple(np.round(img.header.get_zooms()[:3], 3)), nib.aff2axcodes(img.affine), dataset.modality)
    assert len({v[0] for v in seen.values()}) == len(seen)  # spacing
    # storage orientation: only site-a (LPS) and site-unseen (LPI) share one once prepped, as a
    # DICOM series has no slice direction of its own beyond its slice normal
    assert len({v[1] for v in seen.values()}) == len(seen) - 1
    assert any(v[1][2] not in "SI" for v in seen.values())  # a site with non-axial slices
    assert {v[2] for v in seen.values()} == {"CT", "MR"}
    counts = {s: scaled_profile(p, SMALL).n_train for s, p in DEMO_PROFILES.items()}
    assert counts[UNSEEN_SITE] == 0 and counts["site-a"] > 0


def test_lesion_prevalence_follows_the_profile(tmp_path):
    profile = DEMO_PROFILES["site-a"]
    present = []
    for seed in range(6):
        dataset = load_site_dataset(_site(tmp_path / str(seed), "site-a", seed=seed))
        for case in dataset.training + dataset.test:
            present.append(bool((np.asanyarray(nib.load(str(case.label)).dataobj) == 2).any()))
    # 36 cases, expected 0.75: the binomial sd is 0.07, the tolerance 3 sd
    assert abs(np.mean(present) - profile.lesion_prevalence) < 0.22
    assert 0 < sum(present) < len(present)


def test_classification_class_is_lesion_presence(tmp_path):
    seg = load_site_dataset(_site(tmp_path, "site-b", seed=9, task="segmentation"))
    cls = load_site_dataset(_site(tmp_path, "site-b", seed=9, task="classification"))
    assert cls.kind == "classification" and cls.labels == demo.CLASSIFICATION_LABELS
    assert len(seg.training) == len(cls.training) and len(seg.test) == len(cls.test)
    for s_case, c_case in zip(seg.training + seg.test, cls.training + cls.test):
        assert s_case.name == c_case.name
        lesion = bool((np.asanyarray(nib.load(str(s_case.label)).dataobj) == 2).any())
        assert c_case.label == int(lesion)
        a, b = nib.load(str(s_case.image)), nib.load(str(c_case.image))
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]


def test_existing_complete_site_is_reused(tmp_path):
    target = tmp_path / "site"
    write_demo_site(target, "site-c", seed=1, size=SMALL)
    before = _volumes(target)
    stamp = (target / "dataset.json").stat().st_mtime_ns
    # another seed would give other data: reuse means the folder is left exactly as it was
    assert write_demo_site(target, "site-c", seed=2, size=SMALL) == target
    assert (target / "dataset.json").stat().st_mtime_ns == stamp
    after = _volumes(target)
    assert all(np.array_equal(before[k][0], after[k][0]) for k in before)
    assert _leftovers(tmp_path) == []


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    real = demo.synthesize_case
    calls = []

    def failing(profile, rng, with_lesion):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(profile, rng, with_lesion)

    monkeypatch.setattr(demo, "synthesize_case", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_site(tmp_path / "site", "site-c", seed=1, size=SMALL)
    assert not (tmp_path / "site").exists()
    assert _leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo, "synthesize_case", real)
    write_demo_site(tmp_path / "site", "site-c", seed=1, size=SMALL)
    load_site_dataset(tmp_path / "site")
    assert _leftovers(tmp_path) == []


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="site-z"):
        write_demo_site(tmp_path / "x", "site-z", seed=1)
    with pytest.raises(ValueError, match="detection"):
        write_demo_site(tmp_path / "x", "site-a", seed=1, task="detection")
    with pytest.raises(ValueError, match="huge"):
        write_demo_site(tmp_path / "x", "site-a", seed=1, size="huge")
    assert not (tmp_path / "x").exists()
