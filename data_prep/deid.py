"""De-identification: keyed pseudonyms and sidecars built from a whitelist.

Nothing from the DICOM header reaches an output unless it is named here (a whitelist, in the
spirit of the DICOM PS3.15 Annex E basic profile: identifiers, dates, names, institutions,
free text and UIDs are never copied). Case names are HMAC-SHA256 pseudonyms keyed with a
per-site secret that lives only in ``OUTPUT_DIR/private/`` (mode 0600), so the same series
keeps its name across runs while nobody without the secret can link a name to a patient.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

PRIVATE_DIR = "private"
SECRET_FILE = "site_secret.key"

# Acquisition parameters kept in sidecars (all non-identifying; Annex E retains them).
SIDECAR_FIELDS = (
    "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "EchoTime",
    "RepetitionTime", "InversionTime", "FlipAngle", "KVP", "ConvolutionKernel",
    "SliceThickness", "SpacingBetweenSlices", "BodyPartExamined", "ScanningSequence",
    "SequenceVariant", "MRAcquisitionType", "XRayTubeCurrent", "ExposureTime",
    "ReconstructionDiameter", "PixelBandwidth", "ImagingFrequency",
)
MAX_TEXT = 64


def private_dir(output_dir: str | os.PathLike) -> Path:
    """``OUTPUT_DIR/private`` created with mode 0700."""
    path = Path(output_dir) / PRIVATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_or_create_secret(output_dir: str | os.PathLike) -> bytes:
    """The site secret: 32 random bytes, created once with mode 0600 (never overwritten)."""
    path = private_dir(output_dir) / SECRET_FILE
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid site secret (64 hex characters)") from exc
    if len(secret) < 16:
        raise ValueError(f"{path} is too short to be a site secret")
    return secret


def pseudonym(secret: bytes, kind: str, value: str, length: int = 16) -> str:
    """Keyed hash of ``value``: stable per site, not linkable without the secret."""
    digest = hmac.new(secret, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:length]


def case_name(secret: bytes, group_key: str) -> str:
    """Case identifier used in file names: ``case-<16 hex>``."""
    return "case-" + pseudonym(secret, "case", group_key)


def _clean(value):
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def acquisition_sidecar(params: dict) -> dict:
    """The whitelisted acquisition parameters of a series."""
    return {k: _clean(params[k]) for k in SIDECAR_FIELDS if k in params}
