"""Multi-channel inputs for ``fedimaging predict``: one file per channel, or one 4D file.

A model trained on N channels (``in-channels``) takes a case either as nnU-Net names it,
``<case>_0000.nii.gz`` with ``<case>_0001.nii.gz`` ... beside it (pass the ``_0000`` file), or as
one 4D NIfTI whose 4th dimension holds the N channels (split into per-channel files in the
work folder). Each channel is normalised as in training, from the channel names the sites
agreed on before round 1 (``RUN_DIR/channels.json``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.site_dataset import AFFINE_TOLERANCE_MM

CHANNEL_FILE_RE = re.compile(r"^(?P<case>.+)_0000(?P<ending>\.nii(?:\.gz)?)$")


def channel_names_of_run(run_dir: Path, in_channels: int) -> tuple[str, ...] | None:
    """The channel names recorded at study start, or None when the run has no ``channels.json``."""
    path = Path(run_dir) / "channels.json"
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("channel-names", [])
    except (OSError, ValueError, AttributeError):
        return None
    return tuple(str(n) for n in names) if len(names) == in_channels else None


def open_channels(path: Path, workdir: Path, n: int, error: type[Exception]):
    """(case name, channel files, affine, shape) of an N-channel case; raise ``error`` naming the file."""
    from data_prep.nifti_writer import write_nifti

    match = CHANNEL_FILE_RE.match(path.name)
    if match:
        files = [path] + [path.with_name(f"{match['case']}_{c:04d}{match['ending']}") for c in range(1, n)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise error(f"{path}: the model takes {n} channels; missing channel file(s) {missing}")
        images = [nib.load(str(f)) for f in files]
        first = images[0]
        for f, img in zip(files[1:], images[1:]):
            if img.shape[:3] != first.shape[:3] or np.abs(img.affine - first.affine).max() > AFFINE_TOLERANCE_MM:
                raise error(f"{f}: not on the voxel grid of {path.name} (shape {img.shape} vs {first.shape})")
        return match["case"], files, np.asarray(first.affine), tuple(int(s) for s in first.shape[:3])
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types
        raise error(f"cannot read NIfTI {path}: {exc}") from None
    if len(image.shape) != 4 or image.shape[3] != n:
        raise error(f"{path}: the model takes {n} channels: pass <case>_0000.nii.gz (with _0001 ... beside it) "
                    f"or a 4D file with {n} volumes, got shape {tuple(image.shape)}")
    data = np.asanyarray(image.dataobj)
    name = path.name.split(".nii")[0]
    files = []
    for c in range(n):
        target = workdir / f"{name}_{c:04d}.nii.gz"
        write_nifti(target, np.ascontiguousarray(data[..., c]), np.asarray(image.affine))
        files.append(target)
    return name, files, np.asarray(image.affine), tuple(int(s) for s in image.shape[:3])
