"""What a NIfTI data set holds: its format, channels, labels and cases (nothing is converted here).

Three layouts are understood:

- **MSD** (Medical Segmentation Decathlon, ``dataset.json`` v1): ``modality`` (index -> name),
  ``labels`` (value -> name), ``training`` (image/label paths) and ``test`` (image paths); an
  image is 3D, or 4D with the channels in the 4th dimension.
- **nnU-Net v2 raw**: ``dataset.json`` with ``channel_names`` and ``labels`` (name -> value),
  ``imagesTr/<case>_<XXXX><file_ending>`` one file per channel, ``labelsTr/<case><file_ending>``,
  optional ``imagesTs/``.
- **folders**: NIfTI images in INPUT (``<case>.nii.gz``, or ``<case>_0000.nii.gz``, ... one per
  channel) and label maps with matching names in ``--labels DIR``.

Every path named by a ``dataset.json`` must stay inside INPUT.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedimaging.io import read_json_object

FORMATS = ("auto", "msd", "nnunet", "folders")
NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class SourceError(ValueError):
    """The input data set cannot be read as the requested format; the message names the file."""


@dataclass
class SourceCase:
    """One input case: its image file(s) (one 4D file, or one file per channel) and label."""

    key: str  # the source's own case identifier (stays in private/)
    images: list[Path | None]  # None marks a channel file that is missing
    label: Path | None
    split: str = "train"  # "train" (labelled) or "test" (the source's own test list)


@dataclass
class Source:
    """A data set to import: format, channel names, declared labels, cases."""

    format: str
    channel_names: list[str]
    labels: dict[str, int] | None  # None: not declared (plain folders), taken from the label maps
    cases: list[SourceCase]
    name: str = "imported"
    problems: list[str] = field(default_factory=list)


def strip_ending(name: str) -> str | None:
    """``x.nii.gz`` -> ``x``; None when the name is not a NIfTI file."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def detect_format(input_path: Path) -> str:
    """``msd``, ``nnunet`` or ``folders`` from what INPUT holds."""
    manifest = input_path / "dataset.json"
    if not manifest.is_file():
        return "folders"
    meta = read_json_object(manifest, SourceError)
    if "channel_names" in meta:
        return "nnunet"
    if "modality" in meta:
        return "msd"
    raise SourceError(f"{manifest}: neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD); "
                      "pass --format")


def _inside(root: Path, rel, where: str) -> Path:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or rel.startswith("~"):
        raise SourceError(f"{where}: expected a path relative to the data set, got {rel!r}")
    path = (root / rel).resolve()
    if root not in path.parents:
        raise SourceError(f"{where}: path {rel!r} leaves the data set folder {root}")
    return path


def _ordered_names(mapping, where: str) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        raise SourceError(f"{where}: expected an object of channel index -> name")
    try:
        keys = sorted(mapping, key=int)
    except ValueError:
        raise SourceError(f"{where}: channel indices must be integers, got {sorted(mapping)}") from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise SourceError(f"{where}: channel indices must be 0..{len(keys) - 1}, got {keys}")
    return [str(mapping[k]).strip() or f"channel{k}" for k in keys]


def read_msd(root: Path) -> Source:
    manifest = root / "dataset.json"
    meta = read_json_object(manifest, SourceError)
    channels = _ordered_names(meta.get("modality"), f"{manifest} 'modality'")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise SourceError(f"{manifest}: 'labels' must map label values to names")
    try:
        labels = {str(name): int(value) for value, name in raw_labels.items()}
    except ValueError:
        raise SourceError(f"{manifest}: MSD 'labels' keys must be integer values, got {sorted(raw_labels)}") from None
    cases = []
    for i, entry in enumerate(meta.get("training", [])):
        where = f"{manifest} training[{i}]"
        if not isinstance(entry, dict) or "image" not in entry:
            raise SourceError(f"{where}: expected {{'image': ..., 'label': ...}}")
        image = _inside(root, entry["image"], where)
        label = _inside(root, entry["label"], where) if entry.get("label") else None
        cases.append(SourceCase(strip_ending(image.name) or image.name, [image], label, "train"))
    for i, entry in enumerate(meta.get("test", [])):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        image = _inside(root, rel, f"{manifest} test[{i}]")
        cases.append(SourceCase(strip_ending(image.name) or image.name, [image], None, "test"))
    return Source("msd", channels, labels, cases, name=str(meta.get("name") or "imported"))


def _channel_cases(folder: Path, ending: str | None, n_channels: int | None) -> dict[str, list[Path | None]]:
    """Case -> channel files found in ``folder`` (``<case>_XXXX``); a gap is None."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        stem = strip_ending(path.name) if ending is None else (
            path.name[: -len(ending)] if path.name.endswith(ending) else None)
        if not path.is_file() or stem is None:
            continue
        m = CHANNEL_RE.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        found.setdefault(case, {})[channel] = path
    out = {}
    for case, files in found.items():
        n = n_channels or (max(files) + 1)
        out[case] = [files.get(c) for c in range(n)]
    return out


def read_nnunet(root: Path) -> Source:
    manifest = root / "dataset.json"
    meta = read_json_object(manifest, SourceError)
    channels = _ordered_names(meta.get("channel_names"), f"{manifest} 'channel_names'")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise SourceError(f"{manifest}: file_ending {ending!r} is not NIfTI (.nii.gz or .nii)")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise SourceError(f"{manifest}: 'labels' must map names to label values")
    labels = {}
    for name, value in raw_labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise SourceError(f"{manifest}: label {name!r} = {value!r}: only integer labels are supported "
                              "(nnU-Net region labels are not)")
        labels[str(name)] = value
    cases = []
    for split, sub in (("train", "imagesTr"), ("test", "imagesTs")):
        for key, files in sorted(_channel_cases(root / sub, ending, len(channels)).items()):
            label = root / "labelsTr" / f"{key}{ending}" if split == "train" else None
            if split == "test" and (root / "labelsTs" / f"{key}{ending}").is_file():
                label = root / "labelsTs" / f"{key}{ending}"
            cases.append(SourceCase(key, files, label if label is None or label.is_file() else None, split))
    return Source("nnunet", channels, labels, cases, name=str(meta.get("name") or "imported"))


def read_folders(root: Path, labels_dir: Path | None, modality: str | None) -> Source:
    if modality is None:
        raise SourceError("plain folders do not say their modality: pass --modality CT or --modality MR")
    if labels_dir is not None and not labels_dir.is_dir():
        raise SourceError(f"labels folder {labels_dir} does not exist")
    found = _channel_cases(root, None, None)
    if not found:
        raise SourceError(f"{root}: no NIfTI images (*.nii.gz, *.nii) found")
    n = max(len(files) for files in found.values())
    cases = []
    for key, files in sorted(found.items()):
        label = None
        if labels_dir is not None:
            label = next((labels_dir / f"{key}{e}" for e in NIFTI_ENDINGS if (labels_dir / f"{key}{e}").is_file()), None)
        files = files + [None] * (n - len(files))
        cases.append(SourceCase(key, files, label, "train" if label is not None else "test"))
    names = [modality] if n == 1 else [f"{modality}{c}" for c in range(n)]
    return Source("folders", names, None, cases, name=root.name or "imported")


def read_source(input_path: Path, fmt: str = "auto", labels_dir: Path | None = None,
                modality: str | None = None) -> Source:
    """Read INPUT as ``fmt`` (``auto`` detects it); raise :class:`SourceError` naming the problem."""
    if fmt not in FORMATS:
        raise SourceError(f"--format must be one of {FORMATS}, got {fmt!r}")
    root = input_path.resolve()
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt in ("msd", "nnunet") and not (root / "dataset.json").is_file():
        raise SourceError(f"{root / 'dataset.json'} is missing: not an {fmt} data set")
    source = {"msd": read_msd, "nnunet": read_nnunet}[fmt](root) if fmt != "folders" else \
        read_folders(root, labels_dir.resolve() if labels_dir else None, modality)
    if modality is not None and source.format != "folders" and len(source.channel_names) == 1:
        source.channel_names = [modality]  # the user says what the single channel is
    if not source.cases:
        raise SourceError(f"{root}: the data set lists no cases")
    return source
