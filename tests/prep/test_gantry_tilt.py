"""Gantry-tilted CT, checked in world coordinates against the DICOM geometry and against dcm2niix.

Each synthetic series is written with pydicom (``write_volume``) from a linear field of physical
position, f(p) = 4x + 3y + 2z + 100 (LPS mm), so the true value at any point is known and linear
interpolation reproduces it to rounding. Acquired pixel (i, j) of slice k lies at
IPP_k + i*dx*row + j*dy*col (PS3.3 C.7.6.2.1.1); for a tilted stack the IPP step is the table
step, not the slice normal, so the acquired region is a sheared box. The matrix covers both tilt
signs, both table directions, slices stored ascending or descending, and tilt given by
GantryDetectorTilt or only by the positions.
"""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from data_prep.prep import prepare_site
from tests.prep import world
from tests.prep.conftest import dcm2niix_path, prepared_images, write_volume

TILT_DEG = 17.0
SHAPE = (12, 14, 6)  # columns, rows, slices
PIXEL = (1.0, 1.25)  # dx (along a row), dy (down a column) in mm
TABLE_STEP = 2.0  # mm per slice along the table (LPS z)
ORIGIN = np.array([-6.0, -8.0, 10.0])  # LPS position of the first acquired slice


def field(lps: np.ndarray) -> np.ndarray:
    return 4.0 * lps[..., 0] + 3.0 * lps[..., 1] + 2.0 * lps[..., 2] + 100.0


class TiltedSeries:
    """Geometry of one synthetic tilted acquisition, in LPS."""

    def __init__(self, tilt_sign: int, table: int, axial_iop: bool = False):
        self.tilt_sign = tilt_sign
        t = np.radians(TILT_DEG) * tilt_sign
        self.row = np.array([1.0, 0.0, 0.0])
        if axial_iop:  # image planes axial, stack sheared along y (e.g. a reformatted series)
            self.col = np.array([0.0, 1.0, 0.0])
            self.step = table * TABLE_STEP * np.array([0.0, np.tan(t), 1.0])
        else:  # the scanner's case: image plane tilted about x, table moves along z
            self.col = np.array([0.0, np.cos(t), np.sin(t)])
            self.step = np.array([0.0, 0.0, table * TABLE_STEP])
        self.positions = [ORIGIN + k * self.step for k in range(SHAPE[2])]
        # columns: index steps (i, j, k) -> LPS mm; the acquired box is [0, n-1] in each
        self.box = np.stack([self.row * PIXEL[0], self.col * PIXEL[1], self.step], axis=1)

    def voxels(self) -> np.ndarray:
        """Acquired values, indexed (col, row, slice), rounded as stored."""
        idx = world.voxel_indices(SHAPE).astype(float)
        lps = idx @ self.box.T + ORIGIN
        return np.round(field(lps)).reshape(SHAPE)

    def acquired(self, affine: np.ndarray, shape) -> np.ndarray:
        """Mask of a NIfTI grid's voxels whose centre lies in the acquired (sheared) box."""
        lps = world.voxel_world(affine, shape) * world.LPS_FLIP
        ijk = np.linalg.solve(self.box, (lps - ORIGIN).T).T
        tol = 1e-3
        return np.all((ijk >= -tol) & (ijk <= np.asarray(SHAPE) - 1 + tol), axis=1).reshape(shape[:3])

    def corners_ras(self) -> np.ndarray:
        corners = np.array([[a, b, c] for a in (0, SHAPE[0] - 1) for b in (0, SHAPE[1] - 1)
                            for c in (0, SHAPE[2] - 1)], dtype=float)
        return (corners @ self.box.T + ORIGIN) * world.LPS_FLIP

    def write(self, folder, stored: str, tag: bool) -> None:
        ras = np.eye(4)
        ras[:3, 0] = self.row * PIXEL[0] * world.LPS_FLIP
        ras[:3, 1] = self.col * PIXEL[1] * world.LPS_FLIP
        ras[:3, 2] = np.cross(self.row, self.col) * TABLE_STEP * world.LPS_FLIP  # SliceThickness only
        order = list(range(SHAPE[2])) if stored == "ascending" else list(range(SHAPE[2]))[::-1]
        extra = {"Manufacturer": "Philips"}
        if tag:  # Philips sign convention, as on the real scans: sign of the column cosine's z
            extra["GantryDetectorTilt"] = f"{TILT_DEG * self.tilt_sign:g}"
        write_volume(folder, ras, self.voxels(), positions=self.positions, slice_order=order, extra=extra)


def _prep(src, out):
    result = prepare_site(src, out)
    assert result.exit_code == 0, result.table
    entry = json.loads((out / "prep_report.json").read_text())["series"][0]
    assert "gantry_tilt_corrected" in entry["warnings"]
    images = prepared_images(out)
    assert len(images) == 1
    return nib.load(str(images[0]))


def _dcm2niix_tilt(src, dst) -> nib.Nifti1Image:
    dst.mkdir()
    subprocess.run([dcm2niix_path(), "-z", "y", "-b", "n", "-f", "%j", "-o", str(dst), str(src)],
                   check=True, capture_output=True)
    tilted = sorted(dst.glob("*_Tilt*.nii.gz"))
    assert len(tilted) == 1, sorted(p.name for p in dst.iterdir())
    return nib.load(str(tilted[0]))


def _truth_error(series: TiltedSeries, img) -> tuple[float, int]:
    """(max |value - f(p)| over acquired voxels, number of acquired voxels) of an output image."""
    data = np.asanyarray(img.dataobj).astype(float).reshape(img.shape[:3])
    mask = series.acquired(img.affine, data.shape)
    lps = world.voxel_world(img.affine, data.shape) * world.LPS_FLIP
    err = np.abs(data.reshape(-1) - field(lps))[mask.reshape(-1)]
    return (float(err.max()) if err.size else float("inf")), int(mask.sum())


def _check_prep_output(series: TiltedSeries, img) -> np.ndarray:
    data = np.asanyarray(img.dataobj).astype(float)
    # an orthogonal grid: the slice axis is the image-plane normal, spaced by the true slice gap
    normal = np.cross(series.row, series.col) * world.LPS_FLIP
    slice_axis = img.affine[:3, 2]
    np.testing.assert_allclose(abs(slice_axis @ normal), np.linalg.norm(slice_axis), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(slice_axis), abs(series.step @ np.cross(series.row, series.col)),
                               rtol=1e-5)
    # every acquired pixel lies inside the output grid, and no acquired voxel is lost
    assert world.inside_grid(img.affine, data.shape, series.corners_ras()).all()
    err, n_acquired = _truth_error(series, img)
    assert n_acquired >= SHAPE[0] * (SHAPE[1] - 1) * SHAPE[2], n_acquired
    assert err <= 1.0, err  # same value at the same physical point (two roundings of 0.5)
    # outside the acquired box: the fill value (the darkest acquired value), never stray data
    mask = series.acquired(img.affine, data.shape)
    assert np.all(data[~mask] == data.min())
    # the field of view is the acquired box's extent, not more (one voxel of rounding per side)
    grid_extent = np.ptp(world.world_to_index(img.affine, series.corners_ras()), axis=0)
    assert np.all(np.asarray(data.shape) - 1 <= np.ceil(grid_extent + 1e-6) + 2), (data.shape, grid_extent)
    return mask


@pytest.mark.parametrize("source", ["GantryDetectorTilt", "positions_only"])
@pytest.mark.parametrize("stored", ["ascending", "descending"])
@pytest.mark.parametrize("table", [+1, -1], ids=["table+z", "table-z"])
@pytest.mark.parametrize("tilt_sign", [+1, -1], ids=["tilt+", "tilt-"])
def test_tilt_corrected_matches_geometry_and_dcm2niix(tmp_path, tilt_sign, table, stored, source):
    series = TiltedSeries(tilt_sign, table)
    series.write(tmp_path / "in", stored, tag=source == "GantryDetectorTilt")
    img = _prep(tmp_path / "in", tmp_path / "out")
    prep_mask = _check_prep_output(series, img)

    ref = _dcm2niix_tilt(tmp_path / "in", tmp_path / "dcm2niix")
    ref_mask = series.acquired(ref.affine, ref.shape)
    cmp = world.compare(img, ref, prep_mask, ref_mask)
    ref_err, _ = _truth_error(series, ref)
    if ref_err <= 1.0:  # dcm2niix placed its voxels right: both tools agree point by point
        assert cmp.overlap > 0.5, cmp.overlap
        assert cmp.max_abs <= 2.0, cmp.max_abs
    else:  # dcm2niix's own output contradicts the DICOM geometry here (see the README's prep notes)
        assert cmp.both == 0 or cmp.max_abs > 2.0


@pytest.mark.parametrize("tilt_sign", [+1, -1], ids=["tilt+", "tilt-"])
def test_sheared_stack_of_axial_slices_is_corrected(tmp_path, tilt_sign):
    """Axial image planes whose positions drift in-plane: the shear is only in the positions."""
    series = TiltedSeries(tilt_sign, table=+1, axial_iop=True)
    series.write(tmp_path / "in", "descending", tag=False)
    _check_prep_output(series, _prep(tmp_path / "in", tmp_path / "out"))


@pytest.mark.parametrize("tilt_sign", [+1, -1], ids=["tilt+", "tilt-"])
def test_tilt_rejected_on_request(tmp_path, tilt_sign):
    TiltedSeries(tilt_sign, table=+1).write(tmp_path / "in", "ascending", tag=True)
    result = prepare_site(tmp_path / "in", tmp_path / "out", tilt="reject")
    assert result.exit_code == 3
    entry = json.loads((tmp_path / "out" / "prep_report.json").read_text())["series"][0]
    assert (entry["status"], entry["reason"]) == ("rejected", "gantry_tilt")
    assert prepared_images(tmp_path / "out") == []


def test_world_compare_ignores_field_of_view(tmp_path):
    """The helper itself: the same field on two different grids compares equal; a shift does not."""
    affine_a = np.diag([1.0, 1.0, 2.0, 1.0])
    affine_b = affine_a.copy()
    affine_b[:3, 3] = [3.0, -2.0, 4.0]  # another origin
    affine_b = affine_b @ np.diag([-1.0, 1.0, 1.0, 1.0])  # and a flipped first axis

    def image(affine, shape):
        ras = world.voxel_world(affine, shape)
        return nib.Nifti1Image((2 * ras[:, 0] + ras[:, 1] - ras[:, 2]).reshape(shape), affine)

    a, b = image(affine_a, (8, 9, 5)), image(affine_b, (6, 10, 7))
    same = world.compare(a, b)
    assert 0 < same.both < same.a_defined and same.max_abs < 1e-9
    shifted = nib.Nifti1Image(np.asanyarray(b.dataobj), affine_b @ np.array(
        [[1, 0, 0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert world.compare(a, shifted).max_abs > 1.0
    undefined = np.zeros(b.shape, bool)
    assert world.compare(a, b, b_defined=undefined).both == 0


def test_predict_reads_a_tilted_series_as_prep_writes_it(tmp_path):
    """``fedimaging predict`` converts a DICOM folder with prep's own steps: same grid, same voxels."""
    from app.predict_input import open_case

    series = TiltedSeries(+1, +1)
    series.write(tmp_path / "in", "descending", tag=True)
    prepared = _prep(tmp_path / "in", tmp_path / "out")
    (tmp_path / "work").mkdir()
    case = open_case(tmp_path / "in", tmp_path / "work")
    converted = nib.load(str(case.nifti))
    assert case.modality == "CT" and case.shape == prepared.shape
    np.testing.assert_array_equal(converted.affine, prepared.affine)
    np.testing.assert_array_equal(np.asanyarray(converted.dataobj), np.asanyarray(prepared.dataobj))
    _check_prep_output(series, converted)  # the tilt corrected, as prep does
