"""Match NIfTI label maps to series and check that each label fits its image voxel for voxel.

A label is matched by a mapping file in the labels folder (``mapping.json``:
``{"file.nii.gz": "<SeriesInstanceUID>"}``, or ``mapping.csv`` with columns
``file,series_uid``) or by the SeriesInstanceUID inside the file name. A mapping entry may also
put its case in the held-out test split (``{"file.nii.gz": {"series_uid": "<UID>", "split":
"test"}}``, or a ``split`` column in the CSV): a labelled test case keeps its label
(``imagesTs/`` + ``labelsTs/``) for evaluation but never trains. A label saved in
another axis order (e.g. by another converter) is reoriented onto the image's voxel grid;
a label whose grid still differs from the image is rejected with the reason.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from data_prep.site_dataset import AFFINE_TOLERANCE_MM
from fedimaging.io import read_json_object

UID_RE = re.compile(r"\d+(?:\.\d+){3,}")
LABEL_SUFFIXES = (".nii.gz", ".nii")
SPLITS = ("train", "test")


class LabelError(Exception):
    """A label map cannot be used with its image; ``reason`` is a report code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _label_files(labels_dir: Path) -> list[Path]:
    return sorted(p for p in labels_dir.rglob("*") if p.is_file() and p.name.endswith(LABEL_SUFFIXES))


def _entry(where: str, value) -> tuple[str, str]:
    """(SeriesInstanceUID, split) of one mapping value: a UID string or {series_uid, split}."""
    if isinstance(value, dict):
        uid, split = value.get("series_uid"), value.get("split") or "train"
    else:
        uid, split = value, "train"
    if not isinstance(uid, (str, int)) or not str(uid).strip():
        raise ValueError(f"{where}: expected a SeriesInstanceUID or {{\"series_uid\": ..., \"split\": ...}}, "
                         f"got {value!r}")
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
    return str(uid).strip(), split


def _read_mapping(labels_dir: Path) -> dict[str, tuple[str, str]]:
    """Label file name -> (SeriesInstanceUID, split) from mapping.json and mapping.csv."""
    mapping: dict[str, tuple[str, str]] = {}
    js = labels_dir / "mapping.json"
    if js.is_file():
        data = read_json_object(js, ValueError, "an object {label file: SeriesInstanceUID}")
        mapping.update({str(k): _entry(f"{js} entry {k!r}", v) for k, v in data.items()})
    cs = labels_dir / "mapping.csv"
    if cs.is_file():
        with open(cs, newline="", encoding="utf-8") as handle:
            for n, row in enumerate(csv.DictReader(handle), start=2):
                if "file" not in row or "series_uid" not in row:
                    raise ValueError(f"{cs}: needs columns 'file' and 'series_uid'")
                split = (row.get("split") or "").strip() or "train"
                mapping[row["file"].strip()] = _entry(f"{cs} line {n}", {"series_uid": row["series_uid"],
                                                                          "split": split})
    return mapping


def match_labels(labels_dir: str | Path, series_uids: set[str]) -> tuple[dict[str, Path], list[str]]:
    """Map SeriesInstanceUID -> label file; also return names of label files matching nothing."""
    labels_dir = Path(labels_dir)
    mapping = _read_mapping(labels_dir)
    matched: dict[str, Path] = {}
    unmatched: list[str] = []
    for path in _label_files(labels_dir):
        rel = str(path.relative_to(labels_dir))
        uid = (mapping.get(rel) or mapping.get(path.name) or (None, None))[0]
        if uid is None:
            found = [u for u in UID_RE.findall(path.name) if u in series_uids]
            uid = found[0] if found else None
        if uid is None or uid not in series_uids:
            unmatched.append(rel)
            continue
        matched[uid] = path
    return matched, unmatched


def held_out_series(labels_dir: str | Path) -> set[str]:
    """SeriesInstanceUIDs whose label the mapping puts in the test split (labelled, never trained)."""
    return {uid for uid, split in _read_mapping(Path(labels_dir)).values() if split == "test"}


def conform_label(path: str | Path, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Label voxels on the image grid (``affine``, ``shape``), or raise :class:`LabelError`."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise LabelError("label_unreadable", type(exc).__name__) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise LabelError("label_not_3d", f"label has shape {data.shape}")
    src = ornt.io_orientation(img.affine)
    dst = ornt.io_orientation(affine)
    transform = ornt.ornt_transform(src, dst)
    data = ornt.apply_orientation(data, transform)
    lab_affine = img.affine @ ornt.inv_ornt_aff(transform, img.shape[:3])
    if tuple(data.shape) != tuple(shape[:3]):
        raise LabelError("label_shape_mismatch", f"label {tuple(data.shape)} vs image {tuple(shape[:3])}")
    diff = float(np.abs(lab_affine - affine).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise LabelError("label_geometry_mismatch", f"affines differ by up to {diff:.4g} mm")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise LabelError("label_not_integer", "label map holds non-integer values")
    if data.size and data.min() < 0:
        raise LabelError("label_negative", "label map holds negative values")
    top = int(data.max()) if data.size else 0
    return data.astype(np.uint8 if top < 256 else np.int16)
