"""A DICOM folder's series, and one series' voxels: the steps ``prep`` and ``predict`` share.

``find_series`` scans a folder (only read) and groups its frames into series, setting aside what
cannot form a volume with a reason; ``read_series`` plans one series' grid (geometry checks,
gantry tilt, slice spacing) and reads its voxels on it. Both commands convert a series with the
same code, so a case predicted from DICOM sees exactly the volume ``prep`` would have written.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.geometry import GeometryOptions, VolumePlan, plan_volume
from data_prep.pixels import read_volume
from data_prep.scan import FrameRecord, ScanResult, scan_tree
from data_prep.series import SeriesGroup, group_series


def find_series(root: str | os.PathLike, executor=None, progress=None) -> tuple[ScanResult, list[SeriesGroup]]:
    """Scan ``root`` and group its frames; a group still ``pending`` can be converted."""
    scan = scan_tree(root, executor=executor, progress=progress)
    return scan, group_series(scan.frames)


def read_series(frames: list[FrameRecord], options: GeometryOptions = GeometryOptions(),
                notes: list[str] | None = None) -> tuple[VolumePlan, np.ndarray]:
    """The plan and voxel array (col, row, slice[, time]) of one series.

    Raises ``GeometryError``/``LimitExceeded`` (planning) or ``PixelError`` (decoding). ``notes``,
    when given, receives the plan's geometry warnings before the pixels are read, so a series whose
    pixels then fail still reports them.
    """
    plan = plan_volume(frames, options)
    if notes is not None:
        notes.extend(plan.warnings)
    return plan, read_volume(plan)
