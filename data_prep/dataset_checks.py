"""Checks of a site dataset's values and files that must fail as :class:`DatasetError`, never a traceback.

``dataset.json`` and the files it names come from a site engineer, a script or a hostile user.
Every check here turns what Python, numpy or nibabel would raise (``RecursionError`` for deeply
nested JSON, ``TypeError`` for a class index of 10**400, ``RuntimeError`` for a symlink loop,
``ValueError`` for a NUL byte, ``ImageFileError`` for a label that is not NIfTI, ``EOFError``
for a truncated gzip) into one error type whose message names the file or the value.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import Any

import nibabel as nib

MAX_PATH_CHARS = 1024  # a dataset.json path; each part must also fit the file system (255 bytes)
MAX_LABEL_VALUE = 255  # masks are stored as uint8 (prep, predict)
# channel_names values fedimaging normalises: exactly CT (HU window), or a name that starts with an
# MR modality or sequence (z-score), as MSD/nnU-Net spell them: MRI, T1w, t1gd, T2-FLAIR, mr0, DWI b1000
MR_PREFIXES = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "STIR", "DIR", "BOLD")
KNOWN_MODALITIES = ("CT",) + tuple(f"{p}*" for p in MR_PREFIXES)
GZIP_CHUNK = 1 << 20


class DatasetError(ValueError):
    """A site dataset is missing, malformed or inconsistent; the message names the file."""


def shown(value: Any, limit: int = 300) -> str:
    """``repr`` of a value, cut to ``limit`` characters (a 5,000-character name stays readable)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 12] + f"...({len(text)} chars)"


def check_relative_path(rel: Any, where: str) -> str:
    """A non-empty relative path string without NUL bytes, of a length a file system can hold."""
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: expected a relative file path, got {shown(rel)}")
    if "\x00" in rel:
        raise DatasetError(f"{where}: path {shown(rel)} contains a NUL byte")
    too_long = len(rel) > MAX_PATH_CHARS or any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in rel.split("/"))
    if too_long:
        raise DatasetError(f"{where}: path {shown(rel)} is too long ({len(rel)} characters)")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise DatasetError(f"{where}: path {shown(rel)} must be relative to the dataset folder")
    return rel


def resolve_inside(root: Path, rel: Any, where: str) -> Path:
    """Resolve a dataset.json path and refuse anything that escapes the dataset folder or is no file."""
    rel = check_relative_path(rel, where)
    try:
        resolved = (root / rel).resolve()
        inside = resolved == root or root in resolved.parents
        is_file = inside and resolved.is_file()
    except RuntimeError:  # Python < 3.13: a symlink loop
        raise DatasetError(f"{where}: path {shown(rel)} is a symlink loop") from None
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None) == 40:  # ELOOP
            raise DatasetError(f"{where}: path {shown(rel)} is a symlink loop") from None
        raise DatasetError(f"{where}: path {shown(rel)} cannot be opened: {getattr(exc, 'strerror', None) or exc}") from None
    if not inside:
        raise DatasetError(f"{where}: path {shown(rel)} escapes the dataset folder {root}")
    if not is_file:
        raise DatasetError(f"{where}: file {shown(rel)} does not exist in {root}")
    return resolved


def class_index(raw: Any, declared: set[int], where: str) -> int:
    """A class label: an integer (or integral float) among the declared classes; never bool."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        value = None
    elif isinstance(raw, int):
        value = raw if raw in declared else None
    else:
        value = int(raw) if math.isfinite(raw) and raw.is_integer() and int(raw) in declared else None
    if value is None:
        raise DatasetError(f"{where}: class label {shown(raw)} is not one of the declared classes {sorted(declared)}")
    return value


def check_labels(labels: Any, manifest: Path) -> dict[str, int]:
    """``labels``: names to distinct integers 0..MAX_LABEL_VALUE."""
    ok = isinstance(labels, dict) and labels and all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels.values())
    if not ok:
        raise DatasetError(f"{manifest}: 'labels' must map names to integer values")
    bad = [f"{shown(k, 40)}: {shown(v, 40)}" for k, v in labels.items() if not 0 <= v <= MAX_LABEL_VALUE]
    if bad:
        raise DatasetError(f"{manifest}: 'labels' values must lie in 0..{MAX_LABEL_VALUE}, got {', '.join(bad[:3])}")
    if len(set(labels.values())) != len(labels):
        raise DatasetError(f"{manifest}: 'labels' gives two names the same value: {shown(labels, 200)}")
    return dict(labels)


def is_known_modality(name: Any) -> bool:
    """CT exactly, or a name that starts with an MR modality/sequence (see ``MR_PREFIXES``)."""
    if not isinstance(name, str):
        return False
    upper = name.strip().upper()
    return upper == "CT" or upper.startswith(MR_PREFIXES)


def check_modality(channel_name: Any, manifest: Path) -> str:
    """A channel name fedimaging knows how to normalise (CT, or an MR spelling)."""
    name = str(channel_name).strip().upper() if isinstance(channel_name, str) else None
    if not is_known_modality(name):
        raise DatasetError(f"{manifest}: channel {shown(channel_name, 40)} is not a modality fedimaging can "
                           f"normalise (known: {', '.join(KNOWN_MODALITIES)})")
    return name


def _inflates_to(path: Path, needed: int) -> bool:
    """Whether a gzip file (any number of members) inflates to at least ``needed`` bytes.

    Reads in bounded chunks and stops once enough is there, so a gzip bomb costs no memory;
    a stream that ends early raises (EOFError), as nibabel would when reading the voxels.
    """
    total = 0
    with gzip.open(path, "rb") as handle:
        while total < needed:
            chunk = handle.read(GZIP_CHUNK)
            if not chunk:
                return False
            total += len(chunk)
    return True


def _complete(path: Path, img) -> bool:
    """Whether the file holds all the voxel bytes its header declares (cheap for the usual case)."""
    header = img.header
    offset = getattr(img.dataobj, "offset", None)  # where nibabel reads voxels (the header may say 0)
    offset = int(offset if offset is not None else header.get_data_offset())
    needed = offset + math.prod(int(s) for s in img.shape) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
        if not compressed:
            return size >= needed
        handle.seek(-4, os.SEEK_END)  # gzip trailer: length mod 2**32 of the last member
        if int.from_bytes(handle.read(4), "little") == needed % 2**32:
            return True
    return _inflates_to(path, needed)  # multi-member or unusual file: inflate to be sure


def open_nifti(path: Path, where: str, what: str):
    """Header of a NIfTI file that is complete on disk; anything else is a DatasetError."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DatasetError(f"{where}: {what} {path.name} is a {type(img).__name__}, not NIfTI")
        complete = _complete(path, img)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many types
        raise DatasetError(f"{where}: {what} {path.name} is not a readable NIfTI file "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if not complete:
        raise DatasetError(f"{where}: {what} {path.name} is truncated (fewer voxel bytes than its header declares)")
    return img


def spatial_shape(img, path: Path, where: str, what: str) -> tuple[int, ...]:
    """The 3D shape of a one-volume image; a 4D image with more than one volume is refused."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(f"{where}: {what} {path.name} has shape {shape}; expected one 3D volume "
                           "(split 4D series with 'fedimaging prep --split-4d')")
    return shape


def check_unique(cases: list, manifest: Path) -> None:
    """No image listed twice, no case in both lists, no two cases with one name, no shared label map."""
    seen_image: dict[Path, str] = {}
    seen_name: dict[str, str] = {}
    seen_label: dict[Path, str] = {}
    for where, case in cases:
        for seen, key, what in ((seen_image, case.image, "image"), (seen_name, case.name, "case name"),
                                (seen_label, case.label if isinstance(case.label, Path) else None, "label")):
            if key is None:
                continue
            if key in seen:
                shown_key = shown(key.name if isinstance(key, Path) else key)
                raise DatasetError(f"{manifest}: {where} repeats the {what} {shown_key} of {seen[key]} "
                                   "(each case once, and never in both 'training' and 'test')")
            seen[key] = where
