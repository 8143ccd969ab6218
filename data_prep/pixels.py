"""Decode pixel data into a voxel array laid out as the geometry plan says.

Decoding goes through pydicom's pixel handlers (with the pylibjpeg plugins for JPEG, JPEG-LS,
JPEG 2000 and RLE); deflated files are inflated by pydicom when read. Stored values are mapped
to real units with each frame's RescaleSlope/Intercept (CT in HU). Integer results stay
integer (int16 when they fit) so files stay small, as dcm2niix does.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import pixel_array
from scipy import ndimage

from data_prep.geometry import VolumePlan
from data_prep.scan import FrameRecord


class PixelError(Exception):
    """Pixel data could not be decoded; ``reason`` is a report code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _FileCache:
    """Decodes each file once (a multi-frame file serves many frames)."""

    def __init__(self):
        self.path = None
        self.array = None

    def get(self, path: str) -> np.ndarray:
        if path != self.path:
            try:
                try:  # reads only what decoding needs (faster than a full dcmread)
                    array = pixel_array(path)
                except Exception:  # e.g. deflated files: the full reader inflates first
                    array = pydicom.dcmread(path).pixel_array
            except Exception as exc:
                if "no pixel data" in str(exc).lower():
                    raise PixelError("no_pixel_data", "the file has no pixel data element") from exc
                raise PixelError("pixel_decode_failed", f"{type(exc).__name__}: {exc}") from exc
            self.path, self.array = path, array
        return self.array


def _frame_pixels(cache: _FileCache, f: FrameRecord) -> np.ndarray:
    array = cache.get(f.path)
    if f.frame is not None and array.ndim == 3 and f.samples == 1:
        array = array[f.frame]
    if array.shape[:2] != (f.rows, f.cols):
        raise PixelError("pixel_shape_mismatch", f"decoded {array.shape}, header {f.rows}x{f.cols}")
    return array


def _untile(mosaic: np.ndarray, n: int) -> np.ndarray:
    tiles = int(np.ceil(np.sqrt(n)))
    tr, tc = mosaic.shape[0] // tiles, mosaic.shape[1] // tiles
    out = np.empty((n, tr, tc), dtype=mosaic.dtype)
    for k in range(n):
        r, c = divmod(k, tiles)
        out[k] = mosaic[r * tr : (r + 1) * tr, c * tc : (c + 1) * tc]
    return out


def _is_integral(x: float) -> bool:
    return float(x).is_integer()


def _output_dtype(frames: list[FrameRecord], raw_min: float, raw_max: float) -> np.dtype:
    if all(_is_integral(f.slope) and _is_integral(f.intercept) for f in frames):
        lo = min(raw_min * f.slope + f.intercept for f in frames)
        hi = max(raw_max * f.slope + f.intercept for f in frames)
        lo, hi = min(lo, hi), max(lo, hi)
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dtype)
    return np.dtype(np.float32)


def _stack(frames: list[FrameRecord], cache: _FileCache) -> np.ndarray:
    """Stored values of one volume as (slice, row, col), rescaled to real units."""
    first = frames[0]
    if first.mosaic:
        tiles = _untile(_frame_pixels(cache, first), first.mosaic)
        raws = list(tiles)
        scales = [(first.slope, first.intercept)] * first.mosaic
    else:
        raws = [_frame_pixels(cache, f) for f in frames]
        scales = [(f.slope, f.intercept) for f in frames]
    lo = min(float(r.min()) for r in raws)
    hi = max(float(r.max()) for r in raws)
    dtype = _output_dtype(frames, lo, hi)
    out = np.empty((len(raws),) + raws[0].shape, dtype=dtype)
    work = np.float64 if dtype.kind == "f" else np.int64
    for k, (raw, (slope, intercept)) in enumerate(zip(raws, scales)):
        if slope == 1 and intercept == 0:
            out[k] = raw
        elif dtype.kind == "f":
            out[k] = raw.astype(np.float64) * slope + intercept
        else:
            out[k] = raw.astype(work) * int(slope) + int(intercept)
    return out


def _correct_tilt(stack: np.ndarray, shifts: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Place each slice on the orthogonal grid: out[k, r, c] = slice_k[r - shift_r, c - shift_c].

    Linear interpolation in-plane; grid voxels no slice covers get the darkest acquired value.
    """
    cols, rows = grid
    out = np.empty((stack.shape[0], rows, cols), dtype=np.float32)
    fill = float(stack.min())
    for k in range(stack.shape[0]):
        # shifts are (along columns, along rows) in voxels; array axes are (row, col)
        ndimage.affine_transform(stack[k].astype(np.float32), np.eye(2), offset=(-shifts[k][1], -shifts[k][0]),
                                 output_shape=(rows, cols), output=out[k], order=1, mode="constant", cval=fill)
    return out


def _resample(stack: np.ndarray, offsets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(offsets, targets, side="right") - 1, 0, len(offsets) - 2)
    lo, hi = offsets[idx], offsets[idx + 1]
    w = np.clip((targets - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)[:, None, None]
    data = stack.astype(np.float32)
    return data[idx] * (1 - w) + data[idx + 1] * w


def read_volume(plan: VolumePlan) -> np.ndarray:
    """Voxel array indexed (col, row, slice[, time]) matching ``plan.affine``."""
    cache = _FileCache()
    volumes = []
    for frames in plan.volumes:
        stack = _stack(frames, cache)
        dtype = stack.dtype
        if plan.tilt_shifts is not None:
            stack = _correct_tilt(stack, plan.tilt_shifts, plan.tilt_grid)
        if plan.resample_to is not None:
            stack = _resample(stack, plan.slice_offsets, plan.resample_to)
        if stack.dtype != dtype:
            stack = np.round(stack).astype(dtype) if dtype.kind in "iu" else stack.astype(dtype)
        volumes.append(stack.transpose(2, 1, 0))
    if len(volumes) == 1:
        return volumes[0]
    common = np.result_type(*[v.dtype for v in volumes])
    return np.stack([v.astype(common, copy=False) for v in volumes], axis=-1)
