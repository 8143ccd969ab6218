"""The site dataset format (DESIGN 3.4): reading, validating and writing ``dataset.json``.

One module owns the format so that ``prep``, the demo generator and the ClientApp agree.
Validation happens before any training and names the offending file, because a site's
engineer must be able to fix the dataset without reading a traceback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import dataset_checks as checks
from data_prep.dataset_checks import DatasetError
from fedimaging.io import atomic_write_json, read_json_object

DATASET_JSON = "dataset.json"
FILE_ENDING = ".nii.gz"
AFFINE_TOLERANCE_MM = 1e-3
__all__ = ["DatasetError", "Case", "SiteDataset", "load_site_dataset", "write_dataset_json"]


@dataclass(frozen=True)
class Case:
    """One case: an image file and a label (label map path, or class index)."""

    name: str
    image: Path
    label: Path | int | None
    channels: tuple[Path, ...] = ()  # every channel file (``<case>_0000``, ``_0001``, ...), image first

    @property
    def images(self) -> tuple[Path, ...]:
        """The channel files of this case (one for a single-channel dataset)."""
        return self.channels or (self.image,)


@dataclass(frozen=True)
class SiteDataset:
    """A validated site dataset. Paths are absolute and inside ``root``."""

    root: Path
    name: str
    modality: str
    labels: dict[str, int]
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    kind: str  # "segmentation" (label maps) or "classification" (class index per case)
    extra: dict[str, Any] = field(default_factory=dict)
    channel_names: tuple[str, ...] = ()  # from dataset.json, in channel order

    @property
    def num_channels(self) -> int:
        return max(1, len(self.channel_names))

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Label names and values other than background (value 0)."""
        return {k: v for k, v in self.labels.items() if v != 0}

    @property
    def fingerprint_id(self) -> str:
        """Stable identifier of the training content (for the privacy ledger); no paths inside."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        for case in self.training:
            digest.update(case.name.encode())
            digest.update(str(case.image.stat().st_size).encode())
        return digest.hexdigest()[:32]


_resolve_inside = checks.resolve_inside


def _case_name(image_rel: str) -> str:
    base = Path(image_rel).name
    for suffix in (FILE_ENDING, ".nii"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base[:-5] if base.endswith("_0000") else base


def _check_geometry(image: Path, label: Path, where: str, labels: dict[str, int]) -> None:
    img = checks.open_nifti(image, where, "image")
    lab = checks.open_nifti(label, where, "label")
    if checks.spatial_shape(img, image, where, "image") != checks.spatial_shape(lab, label, where, "label"):
        raise DatasetError(
            f"{where}: label {label.name} has shape {tuple(lab.shape)} but image "
            f"{image.name} has shape {tuple(img.shape)}"
        )
    if not np.allclose(img.affine, lab.affine, atol=AFFINE_TOLERANCE_MM):
        raise DatasetError(
            f"{where}: label {label.name} affine differs from image {image.name} "
            f"(max difference {np.abs(img.affine - lab.affine).max():.4g} mm)"
        )
    try:
        values = np.unique(np.asanyarray(lab.dataobj))
    except Exception as exc:  # noqa: BLE001 - corrupt compressed data is found only when read
        raise DatasetError(f"{where}: label {label.name} cannot be read ({type(exc).__name__})") from None
    declared = set(labels.values())
    # NaN/inf and fractional values are never declared (int() of NaN would raise without the file name)
    undeclared = sorted(
        (float(v) if not np.isfinite(v) or v != int(v) else int(v))
        for v in values
        if not np.isfinite(v) or v != int(v) or int(v) not in declared
    )
    if undeclared:
        raise DatasetError(
            f"{where}: label {label.name} contains values {undeclared} that dataset.json "
            f"'labels' does not declare (declared: {sorted(declared)})"
        )


def _channel_files(root: Path, image: Path, image_rel: str, n: int, where: str) -> tuple[Path, ...]:
    """All channel files of a case, named as nnU-Net v2 does: ``<case>_0000``, ``<case>_0001``, ..."""
    if n == 1:
        return ()
    stem = next((image_rel[: -len(e)] for e in (FILE_ENDING, ".nii") if image_rel.endswith(e)), None)
    if stem is None or not stem.endswith("_0000"):
        raise DatasetError(f"{where}: with {n} channels, image {image_rel!r} must be named <case>_0000{FILE_ENDING}")
    ending = image_rel[len(stem):]
    return (image,) + tuple(
        _resolve_inside(root, f"{stem[:-4]}{c:04d}{ending}", f"{where} channel {c}") for c in range(1, n)
    )


def _parse_cases(
    root: Path, entries: Any, list_name: str, labels: dict[str, int], check_geometry: bool, n_channels: int = 1
) -> tuple[tuple[Case, ...], str | None]:
    if not isinstance(entries, list):
        raise DatasetError(f"{root / DATASET_JSON}: '{list_name}' must be a list")
    cases, kinds = [], set()
    for i, entry in enumerate(entries):
        where = f"{root / DATASET_JSON} {list_name}[{i}]"
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{where}: expected an object with an 'image' path")
        image = _resolve_inside(root, entry["image"], where)
        channels = _channel_files(root, image, entry["image"], n_channels, where)
        raw_label = entry.get("label")
        label: Path | int | None
        if raw_label is None:
            label = None
        elif isinstance(raw_label, (bool, int, float)):
            # JSON true/false is not a class index (bool is an int subclass in Python)
            label, kinds = checks.class_index(raw_label, set(labels.values()), where), kinds | {"classification"}
        else:
            label = _resolve_inside(root, raw_label, where)
            kinds.add("segmentation")
            if check_geometry:
                for channel in channels or (image,):
                    _check_geometry(channel, label, where, labels)
        if check_geometry and not isinstance(label, Path):  # label maps checked the image above
            for channel in channels or (image,):
                checks.spatial_shape(checks.open_nifti(channel, where, "image"), channel, where, "image")
        cases.append(Case(_case_name(entry["image"]), image, label, channels))
    if len(kinds) > 1:
        raise DatasetError(f"{root / DATASET_JSON}: '{list_name}' mixes class indices and label maps")
    return tuple(cases), next(iter(kinds), None)


def load_site_dataset(
    path: str | os.PathLike, check_geometry: bool = True, require_training: bool = True
) -> SiteDataset:
    """Read and validate a site dataset folder; raise :class:`DatasetError` naming the problem.

    ``require_training=False`` accepts evaluation-only sites (test cases, no training cases).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"site dataset folder {root} does not exist (set 'data-path')")
    root = root.resolve()
    manifest = root / DATASET_JSON
    if not manifest.is_file():
        raise DatasetError(f"{manifest} is missing: not a site dataset (run 'fedimaging prep')")
    meta = read_json_object(manifest, DatasetError)
    for key in ("name", "channel_names", "labels", "training"):
        if key not in meta:
            raise DatasetError(f"{manifest}: required key '{key}' is missing")
    if not isinstance(meta["name"], str):
        raise DatasetError(f"{manifest}: 'name' must be a string, got {checks.shown(meta['name'])}")
    labels = checks.check_labels(meta["labels"], manifest)
    channels = meta["channel_names"]
    if (
        not isinstance(channels, dict)
        or not channels
        or sorted(channels, key=lambda k: (len(k), k)) != [str(i) for i in range(len(channels))]
    ):
        raise DatasetError(
            f"{manifest}: 'channel_names' must map channel indices \"0\"..\"N-1\" to names, got {checks.shown(channels)}"
        )
    for i in range(len(channels)):
        checks.check_modality(channels[str(i)], manifest)
    channel_names = tuple(channels[str(i)].strip() for i in range(len(channels)))
    if meta.get("file_ending", FILE_ENDING) not in (FILE_ENDING, ".nii"):
        raise DatasetError(f"{manifest}: file_ending {checks.shown(meta['file_ending'])} is not NIfTI")
    training, kind = _parse_cases(root, meta["training"], "training", labels, check_geometry, len(channel_names))
    if not training and require_training:
        raise DatasetError(f"{manifest}: the 'training' list is empty; a site needs training cases")
    test, test_kind = _parse_cases(root, meta.get("test", []), "test", labels, check_geometry, len(channel_names))
    kind = kind or test_kind
    if kind is None:
        raise DatasetError(f"{manifest}: no case has a label (training cases need label maps or class indices)")
    if test_kind not in (None, kind):
        raise DatasetError(f"{manifest}: 'test' labels are of another kind than 'training'")
    if kind == "segmentation" and 0 not in labels.values():
        raise DatasetError(f"{manifest}: segmentation 'labels' must declare background = 0")
    checks.check_unique([(f"training[{i}]", c) for i, c in enumerate(training)]
                        + [(f"test[{i}]", c) for i, c in enumerate(test)], manifest)
    return SiteDataset(
        root=root,
        name=str(meta["name"]),
        modality=channel_names[0].upper(),
        labels=dict(labels),
        training=training,
        test=test,
        kind=kind,
        extra={k: v for k, v in meta.items() if k not in {"training", "test"}},
        channel_names=channel_names,
    )


def write_dataset_json(
    root: str | os.PathLike,
    name: str,
    modality: str,
    labels: dict[str, int],
    training: list[dict[str, Any]],
    test: list[dict[str, Any]],
    channel_names: dict[str, str] | None = None,
    **extra: Any,
) -> Path:
    """Write ``dataset.json`` (nnU-Net v2 / MSD style) atomically and return its path.

    ``channel_names`` (index -> name) for multi-channel images; default one channel, ``modality``.
    """
    meta = {
        "name": name,
        "channel_names": channel_names or {"0": modality},
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(test),
        "file_ending": FILE_ENDING,
        **extra,
        "training": training,
        "test": test,
    }
    target = Path(root) / DATASET_JSON
    atomic_write_json(target, meta)
    return target
