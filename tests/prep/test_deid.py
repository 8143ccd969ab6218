"""De-identification: planted identifiers never reach any output byte outside private/."""

from __future__ import annotations

import json
import stat

import nibabel as nib
import numpy as np
import pytest

from data_prep import deid
from data_prep.prep import prepare_site
from tests.prep.conftest import PHI, all_output_bytes, pattern_volume, prepared_images, write_volume

AFFINE = np.diag([0.9, 0.9, 2.5, 1.0])


def _identifiers() -> list[bytes]:
    """Planted values and the forms they take in text (name parts, ISO date)."""
    values = set(PHI.values())
    values |= {part for v in PHI.values() for part in v.split("^") if len(part) > 3}
    values.add("2023-09-17")
    values.add("1961-04-23")
    return sorted(v.encode() for v in values)


@pytest.fixture
def planted_site(tmp_path):
    src = tmp_path / "Doe^Jonathan^Q-MRN7734129"  # identifying folder name too
    uid = "1.2.826.0.1.3680043.8.498.777"
    write_volume(src / "ct", AFFINE, pattern_volume((10, 8, 4), 1), phi=PHI, series_uid=uid,
                 extra={"ConvolutionKernel": "B30f", "OperatorsName": "Tech^Tina",
                        "PatientAge": "062Y", "DeviceSerialNumber": "SN99812"})
    write_volume(src / "ct2", AFFINE, pattern_volume((10, 8, 4), 2), phi=PHI)
    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.ones((10, 8, 4), np.uint8), AFFINE), labels / f"{uid}.nii.gz")
    out = tmp_path / "out"
    result = prepare_site(src, out, labels=labels)
    assert result.exit_code == 0, result.table
    return out


def test_no_identifier_in_any_output_byte(planted_site):
    needles = _identifiers() + [b"Tech^Tina", b"SN99812", b"062Y"]
    checked = 0
    for path, data in all_output_bytes(planted_site):
        if deid.PRIVATE_DIR in path.relative_to(planted_site).parts:
            continue
        low = data.lower()
        for needle in needles:
            assert needle.lower() not in low, f"{needle!r} found in {path}"
        checked += 1
    assert checked >= 6  # dataset.json, fingerprint, report, 2 images, 1 label, 2 sidecars


def test_nifti_text_fields_blank_or_generic(planted_site):
    for image in prepared_images(planted_site) + sorted(planted_site.glob("labelsTr/*")):
        hdr = nib.load(str(image)).header
        assert hdr["descrip"].item() in (b"", b"fedimaging")
        for key in ("aux_file", "intent_name", "db_name"):
            assert hdr[key].item() == b""
        assert image.name.startswith("case-")


def test_sidecar_keeps_acquisition_parameters(planted_site):
    sidecars = sorted(planted_site.glob("sidecars/*.json"))
    assert len(sidecars) == 2
    side = json.loads(sidecars[0].read_text())
    acq = side["acquisition"]
    assert acq["Manufacturer"] == "SYNTHETIC" and float(acq["KVP"]) == 120.0
    assert side["modality"] == "CT" and side["voxel_spacing_mm"] == pytest.approx([0.9, 0.9, 2.5])
    assert set(acq) <= set(deid.SIDECAR_FIELDS)


def test_secret_and_mapping_only_in_private(planted_site):
    private = planted_site / deid.PRIVATE_DIR
    secret_file = private / deid.SECRET_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / "mapping.json").stat().st_mode) == 0o600
    secret_hex = secret_file.read_text().strip().encode()
    mapping = json.loads((private / "mapping.json").read_text())
    assert any(m["patient_id"] == PHI["PatientID"] for m in mapping.values())
    for path, data in all_output_bytes(planted_site):
        if deid.PRIVATE_DIR not in path.relative_to(planted_site).parts:
            assert secret_hex not in data
    dataset = json.loads((planted_site / "dataset.json").read_text())
    assert set(mapping) == {e["image"].split("/")[1].removesuffix("_0000.nii.gz")
                            for e in dataset["training"] + dataset["test"]}


def test_pseudonyms_are_keyed_and_stable():
    a, b = b"a" * 32, b"b" * 32
    assert deid.case_name(a, "1.2.3#0") == deid.case_name(a, "1.2.3#0")
    assert deid.case_name(a, "1.2.3#0") != deid.case_name(b, "1.2.3#0")
    assert deid.case_name(a, "1.2.3#0") != deid.case_name(a, "1.2.3#1")


def test_secret_created_once(tmp_path):
    first = deid.load_or_create_secret(tmp_path)
    assert deid.load_or_create_secret(tmp_path) == first and len(first) == 32
