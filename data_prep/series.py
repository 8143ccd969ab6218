"""Group frame records into series, and split a series where one volume cannot hold it.

A DICOM series is not always one volume: it may hold several orientations, echoes,
image sizes or acquisitions. Splitting happens on those keys (as dcm2niix does); each part
keeps the series' identity plus a part number so the report can say what happened. Objects
that are not image volumes are set aside here with a reason code. Files that share a Series
UID but carry different SeriesNumbers are kept apart as dcm2niix does; when they are the same
slice stack saved again (e.g. once per transfer syntax) only one copy is converted, so a
dataset never holds the same scan twice.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from pydicom import uid as dicom_uid

from data_prep.scan import FrameRecord

SUPPORTED_MODALITIES = ("CT", "MR")
LOSSLESS_TRANSFER_SYNTAXES = frozenset({
    dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRLittleEndian, dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian, dicom_uid.JPEGLossless, dicom_uid.JPEGLosslessSV1, dicom_uid.JPEGLSLossless,
    dicom_uid.JPEG2000Lossless, dicom_uid.JPEG2000MCLossless, dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL, dicom_uid.RLELossless,
})
LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "SURVEY", "TOPOGRAM")


@dataclass
class SeriesGroup:
    """Frames that should form one volume (3D or 4D), or a set-aside series with its reason."""

    series_uid: str
    part: int
    frames: list[FrameRecord]
    status: str = "pending"  # pending | skipped | rejected
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    files: int = 0

    @property
    def key(self) -> str:
        """Identity of this group inside the site (private: contains the Series UID)."""
        return f"{self.series_uid}#{self.part}"

    @property
    def modality(self) -> str:
        return self.frames[0].modality if self.frames else ""


def _file_count(frames: list[FrameRecord]) -> int:
    return len({f.path for f in frames})


def _orientation_key(frame: FrameRecord) -> tuple:
    if frame.iop is None:
        return ("none",)
    return tuple(np.round(np.asarray(frame.iop), 3) + 0.0)


def _normal(iop) -> np.ndarray:
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    return np.cross(row, col)


def _position_set(frames: list[FrameRecord]) -> frozenset:
    normal = _normal(frames[0].iop)
    return frozenset(round(float(np.dot(f.ipp, normal)), 2) for f in frames if f.ipp is not None)


def _split_acquisitions(frames: list[FrameRecord]) -> tuple[list[list[FrameRecord]], bool]:
    """Merge acquisitions that are pieces of one volume or time points; split otherwise."""
    by_acq: dict = defaultdict(list)
    for f in frames:
        by_acq[f.acquisition].append(f)
    if len(by_acq) < 2 or any(f.iop is None or f.ipp is None for f in frames) or frames[0].mosaic:
        return [frames], False
    sets = [_position_set(v) for v in by_acq.values()]
    identical = all(s == sets[0] for s in sets)
    disjoint = sum(len(s) for s in sets) == len(frozenset().union(*sets))
    if identical or disjoint:
        return [frames], False
    return [by_acq[k] for k in sorted(by_acq, key=lambda a: (a is None, a))], True


def _is_localizer(frames: list[FrameRecord]) -> bool:
    return any(word in part for f in frames for part in f.image_type for word in LOCALIZER_WORDS)


def group_series(frames: list[FrameRecord]) -> list[SeriesGroup]:
    """Group records by SeriesInstanceUID, set aside non-volumes and split mixed series."""
    seen, unique, dup = set(), [], Counter()
    for f in frames:
        ident = (f.sop_uid, f.frame) if f.sop_uid else (f.path, f.frame)
        if ident in seen:
            dup[f.series_uid] += 1
            continue
        seen.add(ident)
        unique.append(f)
    by_series: dict[str, list[FrameRecord]] = defaultdict(list)
    for f in unique:
        by_series[f.series_uid].append(f)

    groups: list[SeriesGroup] = []
    for uid in sorted(by_series):
        groups.extend(_split_series_numbers(uid, by_series[uid], dup[uid]))
    return groups


def _stack_signature(frames: list[FrameRecord]) -> tuple:
    """What makes two copies of a slice stack the same stack, pixel data aside: every slice at the
    same place, with the same numbers, image type and acquisition parameters (kernel, kVp, ...)."""
    return tuple(sorted(
        (tuple(np.round(f.ipp, 3)) if f.ipp is not None else (), _orientation_key(f), f.instance,
         f.acquisition, f.frame, f.rows, f.cols, f.echo, f.temporal, f.dim_index, f.image_type,
         f.slope, f.intercept, tuple(sorted((k, str(v)) for k, v in f.params.items())))
        for f in frames))


def _split_series_numbers(uid: str, frames: list[FrameRecord], duplicates: int) -> list[SeriesGroup]:
    """Keep SeriesNumbers apart (as dcm2niix does); convert one copy of a re-saved identical stack.

    Identical stacks are repeats, not time points: the copy in a lossless transfer syntax with
    the lowest SeriesNumber is converted, the others are reported as ``repeated_series``.
    """
    by_number: dict = defaultdict(list)
    for f in frames:
        by_number[f.series_number].append(f)
    if len(by_number) < 2:
        return _split_series(uid, frames, duplicates)
    numbers = sorted(by_number, key=lambda n: (n is None, n or 0))
    if len({_stack_signature(by_number[n]) for n in numbers}) == 1:
        lossless = [n for n in numbers if all(f.transfer_syntax in LOSSLESS_TRANSFER_SYNTAXES for f in by_number[n])]
        keep = (lossless or numbers)[0]
        groups = _split_series(uid, by_number[keep], duplicates)
        for g in groups:
            g.warnings.append("repeated_series_ignored")
        groups += [SeriesGroup(uid, 0, by_number[n], "skipped", "repeated_series", files=_file_count(by_number[n]))
                   for n in numbers if n != keep]
    else:
        groups = []
        for n in numbers:
            for g in _split_series(uid, by_number[n], duplicates):
                g.warnings.append("split_by_series_number")
                groups.append(g)
    for part, g in enumerate(groups):  # part 0 (the one labels attach to) is the kept copy
        g.part = part
    return groups


def _split_series(uid: str, frames: list[FrameRecord], duplicates: int) -> list[SeriesGroup]:
    files = _file_count(frames)
    reasons = Counter(f.skip_reason for f in frames if f.skip_reason)
    if reasons:
        reason = reasons.most_common(1)[0][0]
        return [SeriesGroup(uid, 0, frames, "skipped", reason, files=files)]
    if _is_localizer(frames):
        return [SeriesGroup(uid, 0, frames, "skipped", "localizer", files=files)]
    modality = frames[0].modality
    if modality not in SUPPORTED_MODALITIES:
        return [SeriesGroup(uid, 0, frames, "skipped", "unsupported_modality", files=files)]
    if any(f.samples != 1 for f in frames):
        return [SeriesGroup(uid, 0, frames, "rejected", "color_image", files=files)]
    if any(f.iop is None or f.ipp is None or f.pixel_spacing is None for f in frames):
        return [SeriesGroup(uid, 0, frames, "rejected", "missing_geometry", files=files)]

    warnings = ["duplicate_files_ignored"] if duplicates else []
    parts: dict = defaultdict(list)
    for f in frames:
        parts[(_orientation_key(f), f.echo, f.rows, f.cols, bool(f.mosaic))].append(f)
    orientations = {k[0] for k in parts}
    sizes = {(k[2], k[3]) for k in parts}
    echoes = {k[1] for k in parts}
    if len(echoes) > 1:
        warnings.append("split_by_echo")
    if len(sizes) > 1:
        warnings.append("split_by_image_size")

    out: list[SeriesGroup] = []
    largest = max(len(v) for v in parts.values())
    for key in sorted(parts, key=lambda k: (-len(parts[k]), str(k))):
        members = parts[key]
        pieces, split = _split_acquisitions(members)
        for piece in pieces:
            g = SeriesGroup(uid, len(out), piece, files=_file_count(piece), warnings=list(warnings))
            if split:
                g.warnings.append("split_by_acquisition")
            if len(orientations) > 1:
                if len(piece) == 1 and largest > 1:
                    g.status, g.reason = "rejected", "stray_slice_other_orientation"
                else:
                    g.warnings.append("mixed_orientation_split")
            out.append(g)
    return out
