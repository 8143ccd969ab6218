"""Slice ordering, the voxel-to-world affine, and detection of geometry a plain stack gets wrong.

Slices are ordered by their position along the slice normal (never InstanceNumber). The
affine maps array index (column, row, slice[, time]) to NIfTI RAS+ millimetres, following
the same convention as dcm2niix: third column = (last position - first position) / (n - 1).
Hard cases (gantry tilt, gaps, uneven spacing, duplicate positions, 4D) are detected here
and either handled by an explicit option or raised as :class:`GeometryError` with a reason
code, so nothing is silently stacked wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_prep.limits import check_resample, check_voxels
from data_prep.scan import FrameRecord

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TILT_DEGREES = 0.1  # in-plane drift of the stack beyond this angle counts as gantry tilt
SPACING_REL_TOL = 0.01  # relative spacing deviation still counted as uniform
SPACING_ABS_TOL = 0.01  # mm


class GeometryError(Exception):
    """A series cannot be stacked into a correct volume; ``reason`` is a report code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class GeometryOptions:
    """How to treat hard geometry: ``tilt`` correct|reject, ``uneven`` reject|resample."""

    tilt: str = "correct"
    uneven: str = "reject"
    split_4d: bool = False


@dataclass
class VolumePlan:
    """What to read and how to place it: ``volumes[t][k]`` is the record of slice k at time t."""

    volumes: list[list[FrameRecord]]
    affine: np.ndarray  # RAS+, index order (col, row, slice)
    spacing: tuple[float, float, float]
    slice_offsets: np.ndarray  # positions along the normal relative to the first slice (mm)
    resample_to: np.ndarray | None = None  # target offsets for uniform spacing
    tilt_shifts: np.ndarray | None = None  # per-slice in-plane shift (cols, rows) into the grid, voxels
    tilt_grid: tuple[int, int] | None = None  # in-plane size (cols, rows) of the tilt-corrected grid
    warnings: list[str] = field(default_factory=list)


def axes(iop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal (unit vectors, LPS)."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


def lps_affine(iop, pixel_spacing, origin, slice_vector) -> np.ndarray:
    """Affine from (col, row, slice) indices to LPS mm: the DICOM PS3.3 C.7.6.2.1.1 equation."""
    row, col, _ = axes(iop)
    affine = np.eye(4)
    affine[:3, 0] = row * float(pixel_spacing[1])  # along a row: column spacing
    affine[:3, 1] = col * float(pixel_spacing[0])  # down a column: row spacing
    affine[:3, 2] = slice_vector
    affine[:3, 3] = origin
    return affine


def ras_affine(iop, pixel_spacing, origin, slice_vector) -> np.ndarray:
    """Same affine in NIfTI RAS+ (x and y negated)."""
    return LPS_TO_RAS @ lps_affine(iop, pixel_spacing, origin, slice_vector)


def _cluster_positions(offsets: np.ndarray, tol: float) -> list[list[int]]:
    """Indices grouped by equal position (offsets must be sorted)."""
    clusters: list[list[int]] = [[0]]
    for i in range(1, len(offsets)):
        if offsets[i] - offsets[clusters[-1][0]] <= tol:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    return clusters


def _time_key(f: FrameRecord):
    # Enhanced DICOM: the dimension indices, slowest-varying last (dcm2niix's volume order).
    return (
        f.temporal if f.temporal is not None else -1,
        tuple(reversed(f.dim_index)),
        f.acquisition if f.acquisition is not None else -1,
        f.instance,
        f.frame if f.frame is not None else -1,
    )


def _check_spacing(diffs: np.ndarray) -> tuple[str | None, float]:
    """Return (problem, uniform spacing); problem is None, 'missing_slices' or 'uneven_spacing'."""
    median = float(np.median(diffs))
    tol = max(SPACING_REL_TOL * median, SPACING_ABS_TOL)
    if np.all(np.abs(diffs - median) <= tol):
        return None, median
    ratios = diffs / median
    near_int = np.abs(ratios - np.round(ratios)) <= max(SPACING_REL_TOL, SPACING_ABS_TOL / median)
    if np.all(near_int) and np.all(np.round(ratios) >= 1):
        return "missing_slices", median
    return "uneven_spacing", median


def plan_mosaic(frames: list[FrameRecord]) -> VolumePlan:
    """Siemens mosaic: each file is one volume; slice positions come from the CSA header."""
    files = sorted(frames, key=_time_key)
    first = files[0]
    row, col, normal = axes(first.iop)
    if first.mosaic_normal is not None:
        normal = np.asarray(first.mosaic_normal, dtype=float)
        normal /= np.linalg.norm(normal)
    tiles = int(np.ceil(np.sqrt(first.mosaic)))
    if first.rows % tiles or first.cols % tiles:
        raise GeometryError("mosaic_inconsistent",
                            f"{first.rows}x{first.cols} mosaic does not divide into {tiles}x{tiles} tiles")
    ps = first.pixel_spacing
    # IPP of a mosaic names the corner of the whole mosaic; shift it to the first tile's corner.
    shift_rows = (first.rows - first.rows / tiles) / 2.0
    shift_cols = (first.cols - first.cols / tiles) / 2.0
    origin = np.asarray(first.ipp) + col * ps[0] * shift_rows + row * ps[1] * shift_cols
    dz = first.spacing_between or first.slice_thickness or 1.0
    plan = VolumePlan(
        volumes=[[f] for f in files],
        affine=ras_affine(first.iop, ps, origin, normal * dz),
        spacing=(float(ps[1]), float(ps[0]), float(dz)),
        slice_offsets=np.arange(first.mosaic) * dz,
    )
    if len(files) > 1:
        plan.warnings.append("4d_series")
    return plan


def _tilt_grid(positions: np.ndarray, row: np.ndarray, col: np.ndarray, pixel_spacing,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Orthogonal in-plane grid that holds every acquired pixel of a sheared (tilted) stack.

    Pixel (i, j) of slice k lies at P_k + i*dx*row + j*dy*col (PS3.3 C.7.6.2.1.1). Writing
    P_k - P_0 = a_k*dx*row + b_k*dy*col + w_k*normal, the same pixel sits at in-plane index
    (i + a_k, j + b_k) of a grid whose origin is P_0 and whose slice axis is the normal. The grid
    is widened to the union of all slices (on slice 0's lattice, so slice 0 is not interpolated).
    Returns (grid origin LPS, per-slice shift (cols, rows) into the grid, grid size (cols, rows)).
    """
    rel = positions - positions[0]
    along = np.stack([rel @ row / float(pixel_spacing[1]), rel @ col / float(pixel_spacing[0])], axis=1)
    along = np.round(along, 6)  # float noise must not move a pixel across a grid border
    low = np.floor(along.min(axis=0) + 1e-6)
    high = np.ceil(along.max(axis=0) + np.asarray(size, float) - 1 - 1e-6)
    grid = (int(high[0] - low[0]) + 1, int(high[1] - low[1]) + 1)
    origin = positions[0] + low[0] * float(pixel_spacing[1]) * row + low[1] * float(pixel_spacing[0]) * col
    return origin, along - low, grid


def plan_volume(frames: list[FrameRecord], options: GeometryOptions = GeometryOptions()) -> VolumePlan:
    """Sort frames into a volume and compute its affine, or raise :class:`GeometryError`."""
    if frames[0].mosaic:
        return plan_mosaic(frames)
    first = frames[0]
    row, col, normal = axes(first.iop)
    ipps = np.array([f.ipp for f in frames], dtype=float)
    along = ipps @ normal
    # stable order: by position, then by acquisition time keys within equal positions
    order = sorted(range(len(frames)), key=lambda i: (round(float(along[i]), 3), _time_key(frames[i])))
    frames = [frames[i] for i in order]
    ipps, along = ipps[order], along[order]
    offsets = along - along[0]
    pixel_spacing = first.pixel_spacing
    warnings: list[str] = []

    tol = max(1e-3, 0.01 * min(pixel_spacing))
    clusters = _cluster_positions(offsets, tol)
    counts = {len(c) for c in clusters}
    if len(counts) > 1:
        raise GeometryError(
            "duplicate_slice_positions",
            f"{len(frames)} images at {len(clusters)} positions with unequal repeats {sorted(counts)}",
        )
    nt = counts.pop()
    if nt > 1 and len(clusters) == 1:
        raise GeometryError("not_a_volume", f"{len(frames)} images all at one position")
    if nt > 1:
        warnings.append("4d_series")
    for c in clusters:  # order the repeats at each position by time
        c.sort(key=lambda i: _time_key(frames[i]))
    volumes = [[frames[c[t]] for c in clusters] for t in range(nt)]
    positions = np.array([ipps[c[0]] for c in clusters])
    offsets = np.array([offsets[c[0]] for c in clusters])
    nz = len(clusters)
    check_voxels((first.cols, first.rows, nz, nt))

    if nz == 1:
        dz = first.spacing_between or first.slice_thickness or 1.0
        affine = ras_affine(first.iop, pixel_spacing, positions[0], normal * dz)
        return VolumePlan(volumes, affine, (pixel_spacing[1], pixel_spacing[0], float(dz)),
                          offsets, warnings=warnings + ["single_slice"])

    total = positions[-1] - positions[0]
    along_total = float(np.dot(total, normal))
    inplane = total - along_total * normal
    tilt_deg = float(np.degrees(np.arctan2(np.linalg.norm(inplane), abs(along_total))))
    diffs = np.diff(offsets)
    problem, dz = _check_spacing(diffs)

    plan = VolumePlan(volumes, np.eye(4), (pixel_spacing[1], pixel_spacing[0], dz), offsets,
                      warnings=warnings)
    if problem is not None:
        if options.uneven != "resample":
            raise GeometryError(problem, f"slice gaps {np.round(diffs, 3).tolist()} mm")
        n_new = int(np.floor(offsets[-1] / dz + 0.5)) + 1
        check_resample(n_new, nz, first.rows, first.cols, nt)  # before allocating n_new slices
        plan.resample_to = np.arange(n_new) * dz
        plan.warnings.append(f"{problem}_resampled")

    # GantryDetectorTilt alone is not enough: what matters is whether the stack is sheared.
    origin = positions[0]
    if tilt_deg > TILT_DEGREES:
        if options.tilt != "correct":
            raise GeometryError("gantry_tilt", f"stack is sheared by {tilt_deg:.2f} degrees")
        origin, plan.tilt_shifts, plan.tilt_grid = _tilt_grid(positions, row, col, pixel_spacing,
                                                             (first.cols, first.rows))
        plan.warnings.append("gantry_tilt_corrected")
        slice_vector = normal * dz
    elif plan.resample_to is not None:
        slice_vector = normal * dz
    else:
        slice_vector = total / (nz - 1)
    if options.split_4d and nt > 1:
        plan.warnings.append("4d_split")
    if abs(first.gantry_tilt) > TILT_DEGREES and "gantry_tilt_corrected" not in plan.warnings:
        plan.warnings.append("gantry_tilt_tag_without_shear")
    plan.affine = ras_affine(first.iop, pixel_spacing, origin, slice_vector)
    return plan
