"""Scan a DICOM tree reading headers only, and describe every image frame as a small record.

Headers are read with ``stop_before_pixels`` so scanning a large archive costs little. Each
file's bytes are hashed while read, which makes re-runs incremental (a series is unchanged
when the hashes of all its files are). Enhanced multi-frame files yield one record per frame,
built from the per-frame functional groups, so grouping and geometry treat classic slices and
frames alike. Records are plain picklable dataclasses so worker processes can send them.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field

import pydicom
from pydicom.errors import InvalidDicomError

from data_prep.deid import SIDECAR_FIELDS
from data_prep.limits import frame_size_problem

DICOMDIR_SOP = "1.2.840.10008.1.3.10"

# SOP classes that carry no image volume, checked in order: (UID or "prefix.", reason code).
_STORAGE = "1.2.840.10008.5.1.4.1.1."
NON_IMAGE_SOP_CLASSES = (
    (_STORAGE + "88.", "non_image_structured_report"),  # SR, key objects, dose SR
    (_STORAGE + "481.3", "non_image_rtstruct"),
    (_STORAGE + "481.", "non_image_radiotherapy"),  # RT plan, dose, image, records
    (_STORAGE + "11.", "non_image_presentation_state"),
    (_STORAGE + "9.", "non_image_waveform"),
    (_STORAGE + "66", "non_image_raw_data"),
    (_STORAGE + "66.4", "non_image_segmentation"),
    (_STORAGE + "66.", "non_image_registration"),
    (_STORAGE + "104.", "non_image_encapsulated_document"),
    (_STORAGE + "7", "secondary_capture"),  # screenshots, dose report pages
    (_STORAGE + "7.", "secondary_capture"),  # multi-frame secondary capture
)


def sop_class_skip_reason(sop_class: str) -> str | None:
    """Reason code for an object that is not an image volume, from its SOP class."""
    for uid, reason in NON_IMAGE_SOP_CLASSES:
        if (uid.endswith(".") and sop_class.startswith(uid)) or sop_class == uid:
            return reason
    return None


@dataclass
class FrameRecord:
    """One 2D image (a classic slice, one frame of a multi-frame file, or a mosaic file)."""

    path: str
    file_hash: str
    frame: int | None  # index in a multi-frame file, None for single-frame files
    sop_uid: str
    sop_class: str
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    samples: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    spacing_between: float | None
    echo: float | None
    acquisition: int | None
    temporal: float | None
    instance: int
    dim_index: tuple[int, ...]  # enhanced DICOM DimensionIndexValues, () for classic files
    slope: float
    intercept: float
    gantry_tilt: float
    mosaic: int | None  # number of slices in a Siemens mosaic
    mosaic_normal: tuple[float, ...] | None
    transfer_syntax: str
    params: dict = field(default_factory=dict)  # acquisition parameters for the sidecar
    skip_reason: str | None = None
    series_number: int | None = None  # SeriesNumber: tells re-saved copies under one Series UID apart


@dataclass
class ScanResult:
    """Records of image frames, plus files that were not usable and why (counts only)."""

    frames: list[FrameRecord]
    unreadable: list[tuple[str, str]]  # (path, reason) of files that look like DICOM but fail
    non_dicom: int = 0
    dicomdir: int = 0


def _as_list(value) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _floats(value, n: int | None = None) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        out = tuple(float(v) for v in _as_list(value))
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out


def _float(value, default: float | None = None) -> float | None:
    try:
        if value is None or value == "":
            return default
        return float(_as_list(value)[0])
    except (TypeError, ValueError, IndexError):
        return default


def _int(value, default: int | None = None) -> int | None:
    f = _float(value)
    return default if f is None else int(round(f))


def _seq_item(ds, name: str):
    seq = ds.get(name)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _acq_params(ds) -> dict:
    """Acquisition parameters a model may need; nothing identifying (a whitelist)."""
    out = {}
    for key in SIDECAR_FIELDS:
        value = ds.get(key)
        if value is None or value == "":
            continue
        items = []
        for v in _as_list(value):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                items.append(float(v) if isinstance(v, float) else int(v))
            else:
                items.append(str(v).strip())
        out[key] = items[0] if len(items) == 1 else items
    return out


def _mosaic_info(ds) -> tuple[int | None, tuple[float, ...] | None]:
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "MOSAIC" not in image_type:
        return None, None
    with warnings.catch_warnings():  # nibabel flags its DICOM readers as experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader

    try:
        csa = csareader.get_csa_header(ds, "image")
        n = csareader.get_n_mosaic(csa)
        normal = csareader.get_slice_normal(csa)
    except Exception:  # malformed CSA: fall back to the public tag
        n, normal = None, None
    if n is None:
        n = _int(ds.get((0x0019, 0x100A)).value) if (0x0019, 0x100A) in ds else None
    return (int(n) if n else None), (tuple(float(v) for v in normal) if normal is not None else None)


def _base_fields(ds, path: str, file_hash: str) -> dict:
    tilt = _float(ds.get("GantryDetectorTilt"), 0.0) or 0.0
    return dict(
        path=path,
        file_hash=file_hash,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class=str(ds.get("SOPClassUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=_int(ds.get("SeriesNumber")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        modality=str(ds.get("Modality", "")).upper(),
        image_type=tuple(str(v).upper() for v in ds.get("ImageType", [])),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        gantry_tilt=tilt,
        transfer_syntax=str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        params=_acq_params(ds),
    )


def _classic_record(ds, base: dict) -> FrameRecord:
    mosaic, normal = _mosaic_info(ds)
    echo = _float(ds.get("EchoNumbers"))
    if echo is None:
        echo = _float(ds.get("EchoTime"))
    temporal = _float(ds.get("TemporalPositionIdentifier"))
    return FrameRecord(
        frame=None,
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        slice_thickness=_float(ds.get("SliceThickness")),
        spacing_between=_float(ds.get("SpacingBetweenSlices")),
        echo=echo,
        acquisition=_int(ds.get("AcquisitionNumber")),
        temporal=temporal,
        instance=_int(ds.get("InstanceNumber"), 0) or 0,
        dim_index=(),
        slope=_float(ds.get("RescaleSlope"), 1.0) or 1.0,
        intercept=_float(ds.get("RescaleIntercept"), 0.0) or 0.0,
        mosaic=mosaic,
        mosaic_normal=normal,
        **base,
    )


def _frame_groups(ds, index: int):
    """(per-frame item, shared item) of an enhanced multi-frame dataset."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    return (per[index] if per is not None and index < len(per) else None), shared


def _fg(per, shared, seq_name: str):
    """A functional group macro item, per-frame first, then shared."""
    for item in (per, shared):
        if item is not None:
            inner = _seq_item(item, seq_name)
            if inner is not None:
                return inner
    return None


def _fill_multiframe_params(params: dict, per, shared, record: "FrameRecord") -> None:
    """Enhanced files keep TE/TR/flip angle/kVp in functional groups, not at the top level."""
    params = dict(params)
    timing = _fg(per, shared, "MRTimingAndRelatedParametersSequence")
    if timing is not None:
        for key in ("RepetitionTime", "FlipAngle"):
            if key not in params and _float(timing.get(key)) is not None:
                params[key] = _float(timing.get(key))
    if "EchoTime" not in params and record.echo is not None:
        params["EchoTime"] = record.echo
    xray = _fg(per, shared, "CTXRayDetailsSequence")
    if xray is not None and "KVP" not in params and _float(xray.get("KVP")) is not None:
        params["KVP"] = _float(xray.get("KVP"))
    if "SliceThickness" not in params and record.slice_thickness is not None:
        params["SliceThickness"] = record.slice_thickness
    record.params = params


def _multiframe_records(ds, base: dict, nframes: int) -> list[FrameRecord]:
    records = []
    for i in range(nframes):
        per, shared = _frame_groups(ds, i)
        pos = _fg(per, shared, "PlanePositionSequence")
        ori = _fg(per, shared, "PlaneOrientationSequence")
        meas = _fg(per, shared, "PixelMeasuresSequence")
        pvt = _fg(per, shared, "PixelValueTransformationSequence")
        content = _fg(per, shared, "FrameContentSequence")
        echo_item = _fg(per, shared, "MREchoSequence")
        ftype = _fg(per, shared, "MRImageFrameTypeSequence") or _fg(per, shared, "CTImageFrameTypeSequence")
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
        if iop is None:
            iop = _floats(ds.get("ImageOrientationPatient"), 6)
        if ipp is None:
            ipp = _floats(ds.get("ImagePositionPatient"), 3)
        spacing = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        temporal, dim_index = None, ()
        if content is not None:
            temporal = _float(content.get("TemporalPositionIndex"))
            dim_index = tuple(int(v) for v in _as_list(content.get("DimensionIndexValues") or []))
        record = FrameRecord(
            frame=i,
            iop=iop,
            ipp=ipp,
            pixel_spacing=spacing or _floats(ds.get("PixelSpacing"), 2),
            slice_thickness=_float(meas.get("SliceThickness")) if meas is not None else _float(ds.get("SliceThickness")),
            spacing_between=_float(meas.get("SpacingBetweenSlices")) if meas is not None else None,
            echo=_float(echo_item.get("EffectiveEchoTime")) if echo_item is not None else None,
            acquisition=_int(ds.get("AcquisitionNumber")),
            temporal=temporal,
            instance=i,
            dim_index=dim_index,
            slope=_float(pvt.get("RescaleSlope"), 1.0) if pvt is not None else (_float(ds.get("RescaleSlope"), 1.0) or 1.0),
            intercept=_float(pvt.get("RescaleIntercept"), 0.0) if pvt is not None else (_float(ds.get("RescaleIntercept"), 0.0) or 0.0),
            mosaic=None,
            mosaic_normal=None,
            **base,
        )
        _fill_multiframe_params(record.params, per, shared, record)
        if ftype is not None:
            frame_type = tuple(str(v).upper() for v in ftype.get("FrameType", []))
            if frame_type:
                record.image_type = frame_type
        if record.slope == 0:
            record.slope = 1.0
        records.append(record)
    return records


def _skip_reason(ds, sop_class: str) -> str | None:
    reason = sop_class_skip_reason(sop_class)
    if reason is not None:
        return reason
    if not ds.get("Rows") or not ds.get("Columns"):
        return "non_image_no_pixels"
    return None


def read_headers(path: str) -> tuple[list[FrameRecord], str | None]:
    """Read one file's header; return its frame records, or a reason it is unusable.

    Reasons: ``not_dicom`` (ignored silently), ``dicomdir`` (ignored), ``unreadable:...``.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return [], f"unreadable:{type(exc).__name__}"
    if len(data) < 132 or data[128:132] != b"DICM":
        # Files without the preamble are still DICOM if they start with a group 0008/0002 tag.
        if len(data) < 8 or data[:2] not in (b"\x08\x00", b"\x02\x00"):
            return [], "not_dicom"
    file_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except InvalidDicomError:
        return [], "not_dicom"
    except Exception as exc:  # truncated or malformed header
        return [], f"unreadable:{type(exc).__name__}"
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        return [], "dicomdir"
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        return [], "not_dicom"
    base = _base_fields(ds, path, file_hash)
    base["sop_class"] = sop_class
    reason = _skip_reason(ds, sop_class)
    try:
        nframes = _int(ds.get("NumberOfFrames"), 1) or 1
        if reason is None and (nframes != 1 or "PerFrameFunctionalGroupsSequence" in ds):
            problem = frame_size_problem(ds, nframes, len(data), base["transfer_syntax"])
            if problem is not None:  # checked before building one record per declared frame
                return [], f"invalid_header:{problem}"
        if reason is None and "PerFrameFunctionalGroupsSequence" in ds:
            records = _multiframe_records(ds, base, nframes)
        else:
            record = _classic_record(ds, base)
            if nframes > 1 and reason is None:
                reason = "multiframe_without_functional_groups"
            records = [record]
    except Exception as exc:  # malformed values in otherwise readable header
        return [], f"unreadable:{type(exc).__name__}"
    if reason is not None:
        for r in records:
            r.skip_reason = reason
    return records, None


def _scan_chunk(paths: list[str]) -> tuple[list[FrameRecord], list[tuple[str, str]], int, int]:
    frames, bad, non_dicom, dicomdir = [], [], 0, 0
    for p in paths:
        records, reason = read_headers(p)
        if reason == "not_dicom":
            non_dicom += 1
        elif reason == "dicomdir":
            dicomdir += 1
        elif reason is not None:
            bad.append((p, reason))
        frames.extend(records)
    return frames, bad, non_dicom, dicomdir


def list_files(root: str | os.PathLike) -> list[str]:
    """All regular files under ``root`` (recursive, sorted, hidden folders included)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                out.append(full)
    return out


def scan_tree(root: str | os.PathLike, executor=None, progress=None) -> ScanResult:
    """Read all headers under ``root``; ``executor`` (a process pool) parallelises by chunks."""
    files = list_files(root)
    chunk = 64
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    result = ScanResult(frames=[], unreadable=[])
    results = executor.map(_scan_chunk, chunks) if executor is not None else map(_scan_chunk, chunks)
    for paths, (frames, bad, non_dicom, dicomdir) in zip(chunks, results):
        result.frames.extend(frames)
        result.unreadable.extend(bad)
        result.non_dicom += non_dicom
        result.dicomdir += dicomdir
        if progress is not None:
            progress.update(len(paths))
    return result

