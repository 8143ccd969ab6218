"""Size limits prep checks before it allocates anything, so a small hostile file cannot hang it.

A DICOM header states sizes (Rows, Columns, NumberOfFrames) and positions; prep allocates
memory from them. A 39 KB file that claims 20 million frames, or four slices one of which lies
5 km away (and so asks ``--uneven resample`` for 5 million slices), must be refused with a
reason code, in milliseconds, instead of running for half an hour. Every limit is documented in
the README ("What fedimaging refuses, and why").
"""

from __future__ import annotations

import math

# One output volume (all time points together) may hold at most this many voxels: 2**30 is a
# 1024 x 1024 x 1024 CT, or 4 GiB as float32 while prep resamples it.
MAX_VOXELS_PER_VOLUME = 2**30
# --uneven resample may fill gaps, but may not invent most of a volume: the resampled stack may
# hold at most this many times the slices there are.
MAX_RESAMPLE_FACTOR = 4
# Encapsulated (compressed) pixel data: every frame needs at least one 8-byte fragment header.
MIN_BYTES_PER_COMPRESSED_FRAME = 8
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "")


class LimitExceeded(Exception):
    """A declared size is impossible or beyond a documented limit; ``reason`` is a report code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def check_voxels(shape: tuple[int, ...], what: str = "volume") -> None:
    """Refuse a volume of more than :data:`MAX_VOXELS_PER_VOLUME` voxels."""
    voxels = math.prod(int(s) for s in shape)
    if voxels > MAX_VOXELS_PER_VOLUME:
        raise LimitExceeded("volume_too_large",
                            f"{what} of shape {tuple(int(s) for s in shape)} has {voxels} voxels "
                            f"(limit {MAX_VOXELS_PER_VOLUME})")


def check_resample(n_target: int, n_slices: int, rows: int, cols: int, time_points: int = 1) -> None:
    """Refuse ``--uneven resample`` when it would invent most of the volume or exceed the limit."""
    if n_target > MAX_RESAMPLE_FACTOR * n_slices:
        raise LimitExceeded("resample_too_many_slices",
                            f"resampling {n_slices} slices to uniform spacing needs {n_target} slices "
                            f"(at most {MAX_RESAMPLE_FACTOR}x the slices present)")
    check_voxels((cols, rows, n_target, time_points), "resampled volume")


def frame_size_problem(ds, nframes: int, file_bytes: int, transfer_syntax: str) -> str | None:
    """Reason code when a header's frame count or image size cannot be true for this file.

    Checks, before any frame record is built: the count is positive, an enhanced file's
    per-frame functional groups hold one item per frame (PS3.3 C.7.6.16), the frames fit the
    voxel limit, and the pixel data they need fit in the file's bytes.
    """
    if nframes < 1:
        return "frame_count_invalid"
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != nframes:
        return "frame_count_mismatch"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows * cols * samples * nframes > MAX_VOXELS_PER_VOLUME:
        return "volume_too_large"
    if transfer_syntax == DEFLATED:  # the file is smaller than what it inflates to
        return None
    if transfer_syntax in NATIVE:
        bits = int(ds.get("BitsAllocated", 8) or 8)
        needed = (rows * cols * samples * nframes * bits + 7) // 8
    else:
        needed = nframes * MIN_BYTES_PER_COMPRESSED_FRAME
    if rows and cols and needed > file_bytes:
        return "pixel_data_too_short"
    return None
