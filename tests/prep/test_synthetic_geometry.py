"""Synthetic series with known geometry: the converter must reproduce the affine and voxels used
to write them, and detect tilt, gaps, duplicates and mixed orientations."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_prep.prep import prepare_site
from tests.prep.conftest import oblique_affine, pattern_volume, prepared_images, write_volume

FLIP = np.diag([-1.0, -1.0, 1.0])


def _single_image(out):
    images = prepared_images(out)
    assert len(images) == 1, images
    return nib.load(str(images[0]))


def _report(out):
    return json.loads((out / "prep_report.json").read_text())


CASES = {
    "axial": np.diag([0.7, 0.7, 3.0, 1.0]) @ np.eye(4),
    "sagittal": np.array([[0, 0, 1.5, -40], [1.1, 0, 0, -90], [0, -1.2, 0, 60], [0, 0, 0, 1.0]]),
    "coronal": np.array([[0.9, 0, 0, -80], [0, 0, 2.0, 15], [0, -0.9, 0, 70], [0, 0, 0, 1.0]]),
    "oblique": oblique_affine(),
    "oblique_reversed_slices": oblique_affine((-30, 25, 5), (1.0, 1.2, 2.0)) @ np.diag([1, 1, -1, 1.0]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_known_geometry_is_reproduced(tmp_path, name):
    affine = CASES[name]
    volume = pattern_volume(seed=len(name))
    order = list(np.random.default_rng(1).permutation(volume.shape[2]))  # shuffled InstanceNumbers
    write_volume(tmp_path / "in", affine, volume, slice_order=order)
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 0, result.table
    img = _single_image(tmp_path / "out")
    # Compare physical placement: reorient the expected image the same canonical way.
    expected = nib.as_closest_canonical(nib.Nifti1Image(volume.astype(np.float32), affine))
    got = nib.as_closest_canonical(img)
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-3)
    np.testing.assert_array_equal(got.get_fdata(), expected.get_fdata())
    hdr = img.header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-3)


def test_ct_rescale_gives_hounsfield_units(tmp_path):
    volume = pattern_volume(seed=3)
    write_volume(tmp_path / "in", CASES["axial"], volume, slope=1.0, intercept=-1024.0)
    prepare_site(tmp_path / "in", tmp_path / "out")
    img = _single_image(tmp_path / "out")
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), volume)


def test_fractional_rescale_is_float(tmp_path):
    volume = pattern_volume(seed=4) * 0.5
    write_volume(tmp_path / "in", CASES["axial"], volume, modality="MR", slope=0.5, intercept=0.0)
    prepare_site(tmp_path / "in", tmp_path / "out")
    img = _single_image(tmp_path / "out")
    np.testing.assert_allclose(img.get_fdata(), volume, atol=1e-4)


def _linear_field(affine, shape):
    """Voxel value = a linear function of world position (exact under linear interpolation)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return np.round(3.0 * world[..., 1] + 2.0 * world[..., 2]) * 1.0, world


def _tilted_positions(affine, nz, tilt_deg):
    """LPS slice positions of a gantry-tilted stack: each slice shifted along the column axis."""
    base = [FLIP @ (affine @ [0, 0, k, 1])[:3] for k in range(nz)]
    col_lps = FLIP @ (affine[:3, 1] / np.linalg.norm(affine[:3, 1]))
    dz = np.linalg.norm(affine[:3, 2])
    return [p + k * dz * np.tan(np.radians(tilt_deg)) * col_lps for k, p in enumerate(base)]


# Tilt correction itself is checked in world space in test_gantry_tilt.py.


def test_gantry_tilt_rejected_on_request(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_volume(tmp_path / "in", affine, pattern_volume((8, 8, 5)), positions=_tilted_positions(affine, 5, 12.0))
    result = prepare_site(tmp_path / "in", tmp_path / "out", tilt="reject")
    assert result.exit_code == 3
    entry = _report(tmp_path / "out")["series"][0]
    assert (entry["status"], entry["reason"]) == ("rejected", "gantry_tilt")
    assert prepared_images(tmp_path / "out") == []


def test_missing_slice_rejected_or_resampled(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (6, 5, 7)
    field, _ = _linear_field(affine, shape)
    keep = [0, 1, 2, 4, 5, 6]  # slice 3 missing
    positions = [FLIP @ (affine @ [0, 0, k, 1])[:3] for k in keep]
    write_volume(tmp_path / "in", affine, field[:, :, keep], positions=positions)
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 3
    assert _report(tmp_path / "out")["series"][0]["reason"] == "missing_slices"

    result = prepare_site(tmp_path / "in", tmp_path / "out2", uneven="resample")
    assert result.exit_code == 0
    img = _single_image(tmp_path / "out2")
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-3)
    np.testing.assert_allclose(img.get_fdata(), field, atol=0.51)  # interpolated slice 3


def test_uneven_spacing_rejected(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    z = [0.0, 1.0, 2.0, 3.7, 4.7]
    positions = [np.array([0.0, 0.0, v]) for v in z]
    write_volume(tmp_path / "in", affine, pattern_volume((6, 6, 5)), positions=positions)
    prepare_site(tmp_path / "in", tmp_path / "out")
    assert _report(tmp_path / "out")["series"][0]["reason"] == "uneven_spacing"


def test_duplicate_positions_rejected(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    positions = [FLIP @ (affine @ [0, 0, k, 1])[:3] for k in (0, 1, 2, 2, 3)]
    write_volume(tmp_path / "in", affine, pattern_volume((6, 6, 5)), positions=positions)
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 3
    assert _report(tmp_path / "out")["series"][0]["reason"] == "duplicate_slice_positions"


def test_4d_written_or_split(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    uid = "1.2.826.0.1.3680043.8.498.123"
    v0, v1 = pattern_volume((6, 5, 4), 1), pattern_volume((6, 5, 4), 2)
    write_volume(tmp_path / "in", affine, v0, series_uid=uid, extra={"AcquisitionNumber": 1}, prefix="a")
    write_volume(tmp_path / "in", affine, v1, series_uid=uid, extra={"AcquisitionNumber": 2}, prefix="b")
    prepare_site(tmp_path / "in", tmp_path / "out")
    img = _single_image(tmp_path / "out")
    assert img.shape == (6, 5, 4, 2)
    np.testing.assert_array_equal(img.get_fdata()[..., 0], v0)
    np.testing.assert_array_equal(img.get_fdata()[..., 1], v1)
    prepare_site(tmp_path / "in", tmp_path / "split", split_4d=True)
    images = prepared_images(tmp_path / "split")
    assert len(images) == 2 and all(nib.load(str(p)).shape == (6, 5, 4) for p in images)


def test_mixed_series_in_one_folder(tmp_path):
    folder = tmp_path / "in"
    a, b = pattern_volume((6, 5, 4), 5), pattern_volume((7, 6, 3), 6)
    write_volume(folder, CASES["axial"], a, prefix="x")
    write_volume(folder, CASES["sagittal"], b, prefix="y")
    result = prepare_site(folder, tmp_path / "out")
    assert result.exit_code == 0
    shapes = sorted(nib.load(str(p)).shape for p in prepared_images(tmp_path / "out"))
    assert shapes == sorted([a.shape, b.shape])


def test_stray_slice_of_other_orientation(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.456"
    write_volume(tmp_path / "in", CASES["axial"], pattern_volume((6, 6, 5)), series_uid=uid, prefix="a")
    write_volume(tmp_path / "in", CASES["coronal"], pattern_volume((6, 6, 1)), series_uid=uid, prefix="b")
    result = prepare_site(tmp_path / "in", tmp_path / "out")
    series = _report(tmp_path / "out")["series"]
    assert sorted((s["status"], s.get("reason")) for s in series) == [
        ("converted", None), ("rejected", "stray_slice_other_orientation")]
    assert result.exit_code == 3
    assert nib.load(str(prepared_images(tmp_path / "out")[0])).shape == (6, 6, 5)
